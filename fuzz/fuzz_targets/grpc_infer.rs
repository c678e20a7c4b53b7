//! KServe v2 gRPC `ModelInferRequest` messages (protobuf bytes) into tensors and requested outputs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgepack_server::fuzzing::grpc_infer_request(data);
});
