// The generated Swift bindings against the built library: the same checks as bindings_test.py and BindingsTest.kt
// (mobile/README.md lists them; tests/python/test_bindings.py keeps the three lists equal).
//
//   swiftc -parse-as-library -emit-library -emit-module -module-name EdgepackMobile -I FFI -L . -ledgepack_mobile \
//     EdgepackMobile.swift -o libEdgepackMobile.so
//   swiftc -parse-as-library -I . -I FFI -L . -lEdgepackMobile -ledgepack_mobile BindingsTest.swift -o t
//   LD_LIBRARY_PATH=LIBDIR ./t FIXTURES.json
//
// (as an app builds it, scripts/swift.sh makes the generated Swift a module, EdgepackMobile, and imports it:
// it does all this in the Debian root that has Swift for Linux). Prints `N passed, N failed`; exits
// non-zero on any failure.
import EdgepackMobile
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

struct CheckFailed: Error, CustomStringConvertible {
    let description: String
}

func ensure(_ cond: Bool, _ msg: @autoclosure () -> String = "check failed", line: Int = #line) throws {
    if !cond { throw CheckFailed(description: "line \(line): \(msg())") }
}

/// Runs `body`, which must throw an `EdgepackError` that `matches` accepts; returns it.
@discardableResult
func raises(_ what: String, line: Int = #line, _ matches: (EdgepackError) -> Bool, _ body: () throws -> Void) throws
    -> EdgepackError
{
    do {
        try body()
    } catch let e as EdgepackError {
        if matches(e) { return e }
        throw CheckFailed(description: "line \(line): expected \(what), got \(e)")
    }
    throw CheckFailed(description: "line \(line): expected \(what), nothing was thrown")
}

@discardableResult
func raisesAsync(_ what: String, line: Int = #line, _ matches: (EdgepackError) -> Bool,
                 _ body: () async throws -> Void) async throws -> EdgepackError
{
    do {
        try await body()
    } catch let e as EdgepackError {
        if matches(e) { return e }
        throw CheckFailed(description: "line \(line): expected \(what), got \(e)")
    }
    throw CheckFailed(description: "line \(line): expected \(what), nothing was thrown")
}

final class Checks {
    var results: [(String, Bool)] = []

    func check(_ name: String, _ body: () async throws -> Void) async {
        let t0 = Date()
        do {
            try await body()
            results.append((name, true))
            print(String(format: "PASS %@ (%.2f s)", name, Date().timeIntervalSince(t0)))
        } catch {
            results.append((name, false))
            print("FAIL \(name)\n\(error)")
        }
        fflush(stdout)
    }
}

func floats(_ d: Data) -> [Float] {
    var out = [Float](repeating: 0, count: d.count / 4)
    _ = out.withUnsafeMutableBytes { d.copyBytes(to: $0) }
    return out.map { Float(bitPattern: UInt32(littleEndian: $0.bitPattern)) }
}

func close(_ a: Data, _ b: Data, tol: Float = 1e-4) -> Bool {
    let x = floats(a), y = floats(b)
    return x.count == y.count && zip(x, y).allSatisfy { abs($0 - $1) <= tol * (1 + abs($1)) }
}

func topLabels(_ c: [ClassScore], _ n: Int = 3) -> [String] {
    c.prefix(n).map { String(($0.label ?? "").split(separator: ",").first ?? "") }
}

func iou(_ a: [Float], _ b: [Float]) -> Float {
    let iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    let ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    let inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)
}

func box(_ d: Detection) -> [Float] { [d.x1, d.y1, d.x2, d.y2] }

/// A foreign transport (what an app does with URLSession), counting its calls; `fail` simulates a dead network.
final class UrlSessionTransport: HttpTransport, @unchecked Sendable {
    private let lock = NSLock()
    private var _calls = 0
    private var _fail = false
    var calls: Int { lock.lock(); defer { lock.unlock() }; return _calls }
    var fail: Bool {
        get { lock.lock(); defer { lock.unlock() }; return _fail }
        set { lock.lock(); _fail = newValue; lock.unlock() }
    }

    func send(request: HttpRequest) throws -> HttpResponse {
        lock.lock()
        _calls += 1
        let failing = _fail
        lock.unlock()
        if failing { throw TransportError.Failed(detail: "simulated network down") }
        var req = URLRequest(url: URL(string: request.url)!)
        req.httpMethod = request.method
        req.timeoutInterval = Double(request.timeoutMs) / 1000
        for h in request.headers { req.addValue(h.value, forHTTPHeaderField: h.name) }
        if !request.body.isEmpty { req.httpBody = request.body }
        // The engine calls `send` on a thread of its own and waits for its answer: block on URLSession.
        final class Answer: @unchecked Sendable {
            var value: (Data?, URLResponse?, Error?) = (nil, nil, nil)
        }
        let answer = Answer(), done = DispatchSemaphore(value: 0)
        URLSession.shared.dataTask(with: req) { d, r, e in
            answer.value = (d, r, e)
            done.signal()
        }.resume()
        done.wait()
        if let e = answer.value.2 {
            if (e as? URLError)?.code == .timedOut { throw TransportError.Timeout(detail: "\(e)") }
            throw TransportError.Failed(detail: "\(e)")
        }
        guard let http = answer.value.1 as? HTTPURLResponse else { throw TransportError.Failed(detail: "no HTTP response") }
        let headers = http.allHeaderFields.map { HttpHeader(name: "\($0.key)", value: "\($0.value)") }
        return HttpResponse(status: UInt16(http.statusCode), headers: headers, body: answer.value.0 ?? Data())
    }
}

/// A transport with a bug: it throws an error of its own, not a `TransportError`.
final class BrokenTransport: HttpTransport, @unchecked Sendable {
    struct AppBug: Error, CustomStringConvertible {
        var description: String { "bug in the app's transport" }
    }

    func send(request: HttpRequest) throws -> HttpResponse { throw AppBug() }
}

@main
struct BindingsTest {
    static func main() async {
        let args = CommandLine.arguments
        guard args.count == 2, let raw = FileManager.default.contents(atPath: args[1]),
              let fx = try? JSONSerialization.jsonObject(with: raw) as? [String: Any]
        else {
            print("usage: bindings-test FIXTURES.json")
            exit(2)
        }
        let failed = await run(fx)
        exit(failed == 0 ? 0 : 1)
    }

    static func run(_ fx: [String: Any]) async -> Int {
        func path(_ k: String) -> String {
            guard let v = fx[k] as? String else { fatalError("fixture \(k) missing") }
            return v
        }
        func read(_ p: String) -> Data {
            guard let d = FileManager.default.contents(atPath: p) else { fatalError("cannot read \(p)") }
            return d
        }
        let photos = fx["photos"] as! [String: String]
        let photo = photos.mapValues { read($0) }
        let chelsea = photo["chelsea"]!, coffee = photo["coffee"]!, astronaut = photo["astronaut"]!
        let key = String(decoding: read(path("public_key")), as: UTF8.self)
        let mnistIn = NamedTensor(name: path("mnist_input_name"), dtype: .f32, shape: [1, 1, 28, 28],
                                  data: read(path("mnist_input")))
        let mnistOut = read(path("mnist_expected"))
        let serve = path("serve"), slow = path("slow"), dead = path("dead")
        let interp = (fx["cpu"] as? String) == "interp"
        let requireGpu = ProcessInfo.processInfo.environment["EDGEPACK_REQUIRE_GPU"] != nil

        func opts(_ backend: Backend = .cpu, cloud: CloudConfig? = nil, key: String? = nil) -> EngineOptions {
            EngineOptions(backend: backend, threads: 1, variant: nil, verificationKey: key, cloud: cloud)
        }
        func cloud(_ endpoint: String, _ model: String, _ policy: FallbackPolicy, deadlineMs: UInt32 = 2000,
                   deviceTimeoutMs: UInt32 = 200, minConfidence: Float = 0.5, breakerFailures: UInt32 = 3,
                   breakerCooldownMs: UInt32 = 30000, version: String? = nil) -> CloudConfig
        {
            CloudConfig(endpoint: endpoint, model: model, version: version, policy: policy, deadlineMs: deadlineMs,
                        deviceTimeoutMs: deviceTimeoutMs, minConfidence: minConfidence,
                        breakerFailures: breakerFailures, breakerCooldownMs: breakerCooldownMs)
        }
        func since(_ t0: Date) -> Double { Date().timeIntervalSince(t0) }

        let effnet: Engine
        do {
            effnet = try Engine.open(path: path("effnet"), options: opts(key: key))
        } catch {
            print("FAIL opening the signed EfficientNet bundle: \(error)\n0 passed, 1 failed")
            return 1
        }
        let c = Checks()

        // --- device ---------------------------------------------------------------------------------------------

        await c.check("sdk version and model info") {
            try ensure(!sdkVersion().isEmpty)
            let info = effnet.info()
            try ensure(info.inputs.count == 1 && info.inputs[0].dtype == .f32
                && Array(info.inputs[0].shape.dropFirst()) == [3, 224, 224], "\(info.inputs)")
            try ensure(info.labels.count == 1000 && info.task == "classification", "\(info)")
            try ensure(info.trusted && info.signer != nil, "\(info)")
            let backend = info.deviceBackend ?? ""
            try ensure(backend.lowercased().contains("cpu"), backend)
            if interp {
                try ensure(backend.contains("kernel interpreter"), backend)
                print("(kernel-interpreter build: \(backend))")
            }
            try ensure(info.deviceError == nil && info.cloud == nil, "\(info)")
        }

        await c.check("classify the shipped photos on the device") {
            let r = try effnet.classify(image: chelsea, topK: 5)
            try ensure(topLabels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"], "\(topLabels(r.classes))")
            try ensure(r.classes.count == 5 && r.classes[0].index == 282, "\(r.classes)")
            try ensure(r.provenance.place == .device && r.provenance.backend.lowercased().contains("cpu"),
                       "\(r.provenance)")
            try ensure(r.provenance.reason.contains("no cloud") && r.provenance.latencyMs > 0, "\(r.provenance)")
            let top = try effnet.classify(image: coffee, topK: 1).classes
            try ensure((top[0].label ?? "").hasPrefix("espresso") && top[0].score > 0.9, "\(top)")
        }

        await c.check("detect the face in the astronaut photo") {
            let face = try Engine.open(path: path("ultraface"), options: opts())
            try ensure(face.info().task == "detection")
            let d = try face.detect(image: astronaut).detections
            try ensure(d.count == 1, "\(d)")
            let b = d[0]
            try ensure(b.score > 0.9 && 0 <= b.x1 && b.x1 < b.x2 && b.x2 <= 512 && 0 <= b.y1 && b.y1 < b.y2
                && b.y2 <= 512, "\(b)")
            try ensure(b.x2 - b.x1 > 50, "\(b)")  // a face, not a speck
        }

        if let yolo = fx["yolo"] as? String, let reference = fx["yolo_reference"] as? [[String: Any]] {
            await c.check("detect document regions with YOLOv8 on the device and through the cloud") {
                let img = read(path("yolo_image"))
                let local = try Engine.open(path: yolo, options: opts()).detect(image: img).detections
                try ensure(local.count == reference.count, "\(local.count) vs \(reference.count) detections")
                for want in reference {
                    let wbox = (want["box_xyxy_image_px"] as! [NSNumber]).map { $0.floatValue }
                    let best = local.max { iou(box($0), wbox) < iou(box($1), wbox) }!
                    try ensure(best.label == want["class"] as? String, "\(best) vs \(want)")
                    try ensure(iou(box(best), wbox) >= 0.9, "\(best) vs \(want)")
                    try ensure(best.mask == nil && best.keypoints.isEmpty, "\(best)")
                }
                let remote = try Engine.cloudOnly(cloud: cloud(serve, "doclayout", .always)).detect(image: img)
                try ensure(remote.provenance.place == .cloud, "\(remote.provenance)")
                try ensure(remote.detections.map { $0.label } == local.map { $0.label }, "\(remote.detections)")
                try ensure(zip(remote.detections, local).allSatisfy { abs($0.x1 - $1.x1) < 0.5 && abs($0.y2 - $1.y2) < 0.5 })
            }
        } else {
            print("SKIP detect document regions with YOLOv8 (no shared model)")
        }

        await c.check("the GPU backend (wgpu) through the bindings") {
            if interp {
                // The small build has no GPU backend: asking for it is a typed error that says so.
                let e = try raises("Internal", { if case .Internal = $0 { return true }; return false }) {
                    _ = try Engine.open(path: path("effnet"), options: opts(.gpu))
                }
                try ensure("\(e)".contains("no GPU backend"), "\(e)")
                return
            }
            let g: Engine
            do {
                g = try Engine.open(path: path("effnet"), options: opts(.gpu))
            } catch let e as EdgepackError {
                switch e {
                case .Internal, .Unavailable, .UnsupportedOp:
                    if requireGpu { throw e }
                    print("!!!!!!!!!! SKIPPED the GPU check: no usable adapter (\(e))")
                    return
                default: throw e
                }
            }
            try ensure((g.info().deviceBackend ?? "").lowercased().contains("gpu"), "\(g.info())")
            let r = try g.classify(image: chelsea, topK: 3)
            try ensure(r.provenance.backend.lowercased().contains("gpu"), "\(r.provenance)")
            try ensure(topLabels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"], "\(r.classes)")
            let cpu = try effnet.classify(image: chelsea, topK: 3).classes
            try ensure(zip(r.classes, cpu).allSatisfy { abs($0.score - $1.score) < 1e-3 }, "\(r.classes) vs \(cpu)")
        }

        await c.check("run named tensors as bytes equals onnxruntime") {
            let m = try Engine.fromBytes(bytes: read(path("mnist")), options: opts())
            let r = try m.run(inputs: [mnistIn])
            try ensure(r.outputs.count == 1 && r.outputs[0].dtype == .f32 && r.outputs[0].shape == [1, 10],
                       "\(r.outputs)")
            try ensure(close(r.outputs[0].data, mnistOut), "\(floats(r.outputs[0].data)) vs \(floats(mnistOut))")
        }

        // --- errors -----------------------------------------------------------------------------------------------

        func isInvalidInput(_ e: EdgepackError) -> Bool { if case .InvalidInput = e { return true }; return false }
        func isInvalidBundle(_ e: EdgepackError) -> Bool { if case .InvalidBundle = e { return true }; return false }

        await c.check("typed errors for bad input") {
            let m = try Engine.fromBytes(bytes: read(path("mnist")), options: opts())
            let e = try raises("InvalidInput", isInvalidInput) {
                _ = try m.run(inputs: [NamedTensor(name: mnistIn.name, dtype: .f32, shape: [1, 1, 28, 27],
                                                   data: Data(count: 28 * 27 * 4))])
            }
            try ensure("\(e)".contains("shape"), "\(e)")
            try raises("InvalidInput", isInvalidInput) {
                _ = try m.run(inputs: [NamedTensor(name: mnistIn.name, dtype: .f32, shape: [1, 1, 28, 28],
                                                   data: Data(count: 10))])
            }
            let d = try raises("InvalidInput", isInvalidInput) {
                _ = try m.run(inputs: [NamedTensor(name: mnistIn.name, dtype: .i64, shape: [1, 1, 28, 28],
                                                   data: Data(count: 28 * 28 * 8))])
            }
            try ensure("\(d)".contains("dtype"), "\(d)")
            try raises("InvalidInput", isInvalidInput) {
                _ = try m.run(inputs: [NamedTensor(name: "nope", dtype: .f32, shape: [1, 1, 28, 28], data: mnistIn.data)])
            }
            try raises("Image", { if case .Image = $0 { return true }; return false }) {
                _ = try effnet.classify(image: Data("not an image".utf8), topK: 5)
            }
            let bare = try Engine.fromBytes(bytes: read(path("mnist_onnx")), options: opts())  // no pre-processing
            let p = try raises("Processing", { if case .Processing = $0 { return true }; return false }) {
                _ = try bare.classify(image: coffee, topK: 5)
            }
            try ensure("\(p)".contains("pre-processing"), "\(p)")
        }

        await c.check("typed errors for bad bundles and keys") {
            try raises("Io", { if case .Io = $0 { return true }; return false }) {
                _ = try Engine.open(path: "/nonexistent/model.edgepack", options: opts())
            }
            let data = read(path("effnet"))
            try raises("InvalidBundle", isInvalidBundle) {
                _ = try Engine.fromBytes(bytes: data.prefix(data.count / 2), options: opts())
            }
            var tampered = data
            tampered[tampered.count - 1000] ^= 0xFF
            try raises("InvalidBundle", isInvalidBundle) { _ = try Engine.fromBytes(bytes: tampered, options: opts()) }
            try raises("InvalidBundle", isInvalidBundle) {
                _ = try Engine.fromBytes(bytes: read(path("unsigned")), options: opts(key: key))
            }
            try raises("InvalidBundle", isInvalidBundle) {
                _ = try Engine.open(path: path("effnet"), options: opts(key: "edgepack-ed25519-public:garbage"))
            }
            try raises("InvalidModel", { if case .InvalidModel = $0 { return true }; return false }) {
                _ = try Engine.fromBytes(bytes: Data([8, 7] + Array("garbage".utf8)), options: opts())
            }
            let u = try raises("UnsupportedOp", { if case .UnsupportedOp = $0 { return true }; return false }) {
                _ = try Engine.fromBytes(bytes: read(path("custom_op")), options: opts())
            }
            guard case let .UnsupportedOp(op, node, _) = u else { throw CheckFailed(description: "\(u)") }
            try ensure(op.hasSuffix("Mystery") && !node.isEmpty, "\(u)")
            try raises("InvalidInput", isInvalidInput) { _ = try Engine.cloudOnly(cloud: cloud("ftp://x", "m", .always)) }
        }

        // --- async (Swift concurrency) ----------------------------------------------------------------------------

        await c.check("async variants") {
            let m = try Engine.fromBytes(bytes: read(path("mnist")), options: opts())
            async let a = effnet.classifyAsync(image: chelsea, topK: 3)
            async let b = effnet.classifyAsync(image: coffee, topK: 1)
            async let r = m.runAsync(inputs: [mnistIn])
            let (ra, rb, rr) = try await (a, b, r)
            try ensure(topLabels(ra.classes) == ["tiger cat", "Egyptian cat", "tabby"], "\(ra.classes)")
            try ensure((rb.classes[0].label ?? "").hasPrefix("espresso"), "\(rb.classes)")
            try ensure(close(rr.outputs[0].data, mnistOut))
            try await raisesAsync("Image", { if case .Image = $0 { return true }; return false }) {
                _ = try await effnet.classifyAsync(image: Data("junk".utf8), topK: 3)
            }
            let face = try Engine.open(path: path("ultraface"), options: opts())
            let d = try await face.detectAsync(image: astronaut)
            try ensure(d.detections.count == 1, "\(d.detections)")
        }

        // --- cloud fallback against a real `edgepack serve` ---------------------------------------------------------

        await c.check("offline: the device answers, the dead cloud is never asked") {
            let t = UrlSessionTransport()
            let e = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(dead, "effnet", .onError)), transport: t)
            let r = try e.classify(image: chelsea, topK: 3)
            try ensure(r.provenance.place == .device && r.provenance.reason.contains("on-error"), "\(r.provenance)")
            try ensure(t.calls == 0 && e.breaker() == .closed(failures: 0), "\(t.calls) \(String(describing: e.breaker()))")
        }

        await c.check("a model the device cannot run is answered by the cloud") {
            let e = try Engine.fromBytes(bytes: read(path("custom_op")), options: opts(cloud: cloud(serve, "mnist", .onUnsupported)))
            let info = e.info()
            try ensure(info.deviceBackend == nil && (info.deviceError ?? "").contains("Mystery"), "\(info)")
            let r = try e.run(inputs: [mnistIn])
            try ensure(r.provenance.place == .cloud && r.provenance.reason.contains("cannot run"), "\(r.provenance)")
            try ensure((r.provenance.deviceError ?? "").contains("Mystery"), "\(r.provenance)")
            try ensure(r.provenance.backend.contains("version 1"), r.provenance.backend)
            try ensure(close(r.outputs[0].data, mnistOut))
            // Never: the same model is a typed error at open.
            try raises("UnsupportedOp", { if case .UnsupportedOp = $0 { return true }; return false }) {
                _ = try Engine.fromBytes(bytes: read(path("custom_op")), options: opts(cloud: cloud(serve, "mnist", .never)))
            }
        }

        await c.check("cloud results equal device results (classify, detect, run; foreign transport)") {
            let t = UrlSessionTransport()
            let cl = try Engine.cloudOnly(cloud: cloud(serve, "effnet", .always), transport: t)
            let r = try cl.classify(image: chelsea, topK: 3)
            try ensure(r.provenance.place == .cloud && t.calls == 1, "\(r.provenance) \(t.calls)")
            let d = try effnet.classify(image: chelsea, topK: 3)
            try ensure(r.classes.map { $0.index } == d.classes.map { $0.index }, "\(r.classes) vs \(d.classes)")
            try ensure(zip(r.classes, d.classes).allSatisfy { abs($0.score - $1.score) < 1e-4 })
            try ensure(topLabels(r.classes) == topLabels(d.classes))
            let f = try Engine.cloudOnly(cloud: cloud(serve, "ultraface", .always))
            let dets = try f.detect(image: astronaut).detections
            let local = try Engine.open(path: path("ultraface"), options: opts()).detect(image: astronaut).detections
            try ensure(dets.count == 1 && local.count == 1 && abs(dets[0].x1 - local[0].x1) < 0.5, "\(dets) vs \(local)")
            let m = try Engine.cloudOnly(cloud: cloud(serve, "mnist", .always, version: "1"), transport: t)
            let out = try m.run(inputs: [mnistIn])
            try ensure(out.provenance.backend.hasSuffix("version 1") && close(out.outputs[0].data, mnistOut),
                       "\(out.provenance)")
            // The server's own error comes back typed.
            let e = try raises("Cloud", { if case .Cloud = $0 { return true }; return false }) {
                _ = try m.run(inputs: [NamedTensor(name: "nope", dtype: .f32, shape: [1], data: Data(count: 4))])
            }
            guard case let .Cloud(status, _) = e else { throw CheckFailed(description: "\(e)") }
            try ensure(status == 400, "\(e)")
        }

        await c.check("cloud down: device result, or a typed error, within the deadline") {
            let e = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(dead, "effnet", .always, deadlineMs: 1000)))
            var t0 = Date()
            let r = try e.classify(image: chelsea, topK: 3)
            try ensure(since(t0) < 1.5, "took \(since(t0)) s")
            try ensure(r.provenance.place == .device && r.provenance.cloudError != nil, "\(r.provenance)")
            try ensure(topLabels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"])
            let cl = try Engine.cloudOnly(cloud: cloud(dead, "effnet", .always, deadlineMs: 1000))
            t0 = Date()
            try raises("Transport", { if case .Transport = $0 { return true }; return false }) {
                _ = try cl.classify(image: chelsea, topK: 3)
            }
            try ensure(since(t0) < 1.5, "took \(since(t0)) s")
        }

        await c.check("slow cloud: the deadline is honoured") {
            let cl = try Engine.cloudOnly(cloud: cloud(slow, "effnet", .always, deadlineMs: 300))
            var t0 = Date()
            let e = try raises("Timeout", { if case .Timeout = $0 { return true }; return false }) {
                _ = try cl.classify(image: chelsea, topK: 3)
            }
            let took = since(t0)
            try ensure(took > 0.25 && took < 0.8, "took \(took) s")
            guard case let .Timeout(deadline, _) = e, deadline == 300 else { throw CheckFailed(description: "\(e)") }
            let d = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(slow, "effnet", .always, deadlineMs: 300)))
            t0 = Date()
            let r = try d.classify(image: chelsea, topK: 3)
            try ensure(r.provenance.place == .device && (r.provenance.cloudError ?? "").contains("deadline"), "\(r.provenance)")
            try ensure(since(t0) < 0.3 + 0.5, "took \(since(t0)) s")
        }

        await c.check("on-timeout: a slow device hands over to the cloud") {
            let slowModel = read(path("slow_mnist"))  // a device run of hundreds of ms; the server's mnist answers in a few
            var t0 = Date()
            _ = try Engine.fromBytes(bytes: slowModel, options: opts()).run(inputs: [mnistIn])
            let deviceS = since(t0)
            let e = try Engine.fromBytes(bytes: slowModel, options: opts(cloud: cloud(serve, "mnist", .onTimeout, deviceTimeoutMs: 20)))
            t0 = Date()
            let r = try e.run(inputs: [mnistIn])
            try ensure(r.provenance.place == .cloud && r.provenance.reason.contains("took over 20 ms"), "\(r.provenance) \(deviceS)")
            try ensure(close(r.outputs[0].data, mnistOut) && since(t0) < deviceS, "\(since(t0)) vs \(deviceS)")
            let sure = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(serve, "effnet", .onTimeout, deviceTimeoutMs: 20000)))
            let p = try sure.classify(image: chelsea, topK: 3).provenance
            try ensure(p.place == .device && p.reason.contains("within 20000 ms"), "\(p)")
            // A slow cloud: a hedge, not a wait. The device's answer wins as soon as it comes.
            let hedge = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(slow, "effnet", .onTimeout,
                                                                                          deadlineMs: 3000, deviceTimeoutMs: 1)))
            t0 = Date()
            let h = try hedge.classify(image: chelsea, topK: 3)
            try ensure(h.provenance.place == .device && h.provenance.reason.contains("answered first"), "\(h.provenance)")
            try ensure(since(t0) < 1.0 && topLabels(h.classes) == ["tiger cat", "Egyptian cat", "tabby"])
        }

        await c.check("on-low-confidence: unsure device results go to the cloud") {
            let unsure = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(serve, "effnet", .onLowConfidence, minConfidence: 0.99)))
            let p = try unsure.classify(image: chelsea, topK: 3).provenance
            try ensure(p.place == .cloud && p.reason.contains("below 0.99"), "\(p)")
            let sure = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(serve, "effnet", .onLowConfidence, minConfidence: 0.1)))
            try ensure(try sure.classify(image: chelsea, topK: 3).provenance.place == .device)
        }

        func isTransport(_ e: EdgepackError) -> Bool { if case .Transport = e { return true }; return false }
        func isOpen(_ s: BreakerState?) -> Bool { if case .open = s { return true }; return false }

        await c.check("circuit breaker: opens after N failures, refuses at once, half-opens, closes on success") {
            let t = UrlSessionTransport()
            t.fail = true
            let cl = try Engine.cloudOnly(cloud: cloud(serve, "effnet", .always, breakerFailures: 2, breakerCooldownMs: 400),
                                          transport: t)
            try raises("Transport", isTransport) { _ = try cl.classify(image: coffee, topK: 1) }
            try ensure(cl.breaker() == .closed(failures: 1), "\(String(describing: cl.breaker()))")
            try raises("Transport", isTransport) { _ = try cl.classify(image: coffee, topK: 1) }
            try ensure(isOpen(cl.breaker()), "\(String(describing: cl.breaker()))")
            let t0 = Date()
            let e = try raises("CircuitOpen", { if case .CircuitOpen = $0 { return true }; return false }) {
                _ = try cl.classify(image: coffee, topK: 1)
            }
            guard case let .CircuitOpen(retry, _) = e else { throw CheckFailed(description: "\(e)") }
            try ensure(since(t0) < 0.1 && t.calls == 2 && retry > 0 && retry <= 400, "\(t.calls) calls, \(e)")
            try await Task.sleep(nanoseconds: 450_000_000)
            try ensure(cl.breaker() == .halfOpen, "\(String(describing: cl.breaker()))")
            try raises("Transport", isTransport) { _ = try cl.classify(image: coffee, topK: 1) }  // the trial fails
            try ensure(isOpen(cl.breaker()) && t.calls == 3, "\(String(describing: cl.breaker())) \(t.calls)")
            try await Task.sleep(nanoseconds: 450_000_000)
            t.fail = false
            let r = try cl.classify(image: coffee, topK: 1)  // the trial succeeds: closed
            try ensure(r.provenance.place == .cloud && cl.breaker() == .closed(failures: 0), "\(String(describing: cl.breaker()))")
        }

        await c.check("circuit breaker with a device: open means an immediate device answer") {
            let t = UrlSessionTransport()
            t.fail = true
            let e = try Engine.open(path: path("effnet"), options: opts(cloud: cloud(serve, "effnet", .always, breakerFailures: 1,
                                                                                     breakerCooldownMs: 60000)), transport: t)
            let r1 = try e.classify(image: coffee, topK: 1)
            try ensure(r1.provenance.place == .device && (r1.provenance.cloudError ?? "").contains("simulated"), "\(r1.provenance)")
            let r2 = try e.classify(image: coffee, topK: 1)
            try ensure(r2.provenance.place == .device && (r2.provenance.cloudError ?? "").contains("breaker open"), "\(r2.provenance)")
            try ensure(t.calls == 1, "\(t.calls) calls")
        }

        await c.check("a transport that raises an unexpected exception is a typed error") {
            let cl = try Engine.cloudOnly(cloud: cloud(serve, "effnet", .always), transport: BrokenTransport())
            let e = try raises("Transport", isTransport) { _ = try cl.classify(image: coffee, topK: 1) }
            try ensure("\(e)".contains("bug in the app") || "\(e)".contains("raised"), "\(e)")
        }

        if let silero = fx["silero"] as? String {
            await c.check("stream: Silero VAD in 32 ms chunks, state carried, gives the reference's 30 speech segments") {
                let audio = floats(read(path("silero_audio")))
                let s = try Engine.open(path: silero, options: opts()).openStream()
                try ensure(s.chunkLen() == 512 && s.sampleRate() == 16000, "\(s.chunkLen()) \(String(describing: s.sampleRate()))")
                var values: [Float] = []
                for i in stride(from: 0, to: audio.count, by: 512) {
                    values += try s.push(samples: Array(audio[i..<min(i + 512, audio.count)])).map { $0.value! }
                }
                try ensure(values.count == 1875, "\(values.count) chunks")
                let speech = values.map { $0 > 0.5 }
                let starts = speech.indices.filter { speech[$0] && ($0 == 0 || !speech[$0 - 1]) }
                let share = Double(speech.filter { $0 }.count) / 1875
                try ensure(starts.count == 30 && abs(share - 0.774) < 0.001, "\(starts.count) segments, \(share)")
                try ensure((Double(starts[0] * 512) / 16000 * 100).rounded() / 100 == 0.03, "\(starts.prefix(3))")
                // Uneven pushes give the same values; reset starts over.
                try s.reset()
                let again = try s.push(samples: Array(audio[0..<700])).map { $0.value! }
                    + s.push(samples: Array(audio[700..<2048])).map { $0.value! }
                try ensure(again == Array(values[0..<4]), "\(again) vs \(values[0..<4])")
                let out = try s.push(samples: Array(audio[2048..<2560]))[0].outputs
                try ensure(out.map { $0.name } == ["output"], "\(out.map { $0.name })")  // the state stays inside
            }
        } else {
            print("SKIP stream: no Silero VAD fixture (../shared absent)")
        }

        let passed = c.results.filter { $0.1 }.count
        let failed = c.results.count - passed
        print("\(passed) passed, \(failed) failed")
        return failed
    }
}
