//! Times the fp32 convolution kernels on the layer shapes of EfficientNet-Lite0, SqueezeNet and YOLOv8n, one thread,
//! side by side (rounds alternate between layers; medians). A tool for kernel work, not a target:
//! `cargo run --release --example fconv_layers [-- FILTER [RUNS]]`.
//! `EDGEPACK_ISA=avx2|avx512vnni` picks the instruction set (default: the best the CPU has);
//! `EDGEPACK_BENCH_CACHE=warm|cold` runs each layer on warm or flushed caches; `EDGEPACK_ACT=silu` gives every
//! layer a SiLU output stage (YOLOv8's) instead of Relu6.
use std::time::Instant;

use edgepack_runtime::kernels::fconv::{Act, FConv, FConvSpec};
use edgepack_runtime::kernels::{ConvGeometry, Isa};

struct Layer {
    name: &'static str,
    hw: [usize; 2],
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    depthwise: bool,
}

const fn l(name: &'static str, h: usize, c_in: usize, c_out: usize, k: usize, stride: usize, dw: bool) -> Layer {
    Layer { name, hw: [h, h], c_in, c_out, k, stride, depthwise: dw }
}

const LAYERS: &[Layer] = &[
    l("stem 3x3/2 3->32 @224", 224, 3, 32, 3, 2, false),
    l("dw3 /1 32 @112", 112, 32, 32, 3, 1, true),
    l("pw 32->16 @112", 112, 32, 16, 1, 1, false),
    l("pw 16->96 @112", 112, 16, 96, 1, 1, false),
    l("dw3 /2 96 @112", 112, 96, 96, 3, 2, true),
    l("pw 96->24 @56", 56, 96, 24, 1, 1, false),
    l("dw3 /1 144 @56", 56, 144, 144, 3, 1, true),
    l("dw5 /2 144 @56", 56, 144, 144, 5, 2, true),
    l("dw5 /1 240 @28", 28, 240, 240, 5, 1, true),
    l("dw5 /1 480 @14", 14, 480, 480, 5, 1, true),
    l("dw5 /1 672 @14", 14, 672, 672, 5, 1, true),
    l("dw5 /2 672 @14", 14, 672, 672, 5, 2, true),
    l("dw5 /1 1152 @7", 7, 1152, 1152, 5, 1, true),
    l("pw 80->480 @14", 14, 80, 480, 1, 1, false),
    l("pw 24->144 @56", 56, 24, 144, 1, 1, false),
    l("pw 144->24 @56", 56, 144, 24, 1, 1, false),
    l("pw 480->112 @14", 14, 480, 112, 1, 1, false),
    l("pw 240->40 @28", 28, 240, 40, 1, 1, false),
    l("pw 672->112 @14", 14, 672, 112, 1, 1, false),
    l("pw 1152->192 @7", 7, 1152, 192, 1, 1, false),
    l("pw 1152->320 @7", 7, 1152, 320, 1, 1, false),
    l("pw 320->1280 @7", 7, 320, 1280, 1, 1, false),
    l("fc 1280->1000 @1", 1, 1280, 1000, 1, 1, false),
    l("sq conv1 3x3/2 3->64 @224", 224, 3, 64, 3, 2, false),
    l("sq fire 3x3 16->64 @55", 55, 16, 64, 3, 1, false),
    l("yolo stem 3x3/2 3->16 @640", 640, 3, 16, 3, 2, false),
    l("yolo 3x3/2 16->32 @320", 320, 16, 32, 3, 2, false),
    l("yolo c2f 3x3 16->16 @160", 160, 16, 16, 3, 1, false),
    l("yolo 3x3/2 32->64 @160", 160, 32, 64, 3, 2, false),
    l("yolo head 3x3 64->64 @80", 80, 64, 64, 3, 1, false),
    l("yolo c2f pw 32->32 @160", 160, 32, 32, 1, 1, false),
    l("yolo c2f pw 48->32 @160", 160, 48, 32, 1, 1, false),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let threads: usize = std::env::var("EDGEPACK_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let isa = std::env::var("EDGEPACK_ISA").ok().and_then(|s| Isa::parse(&s)).unwrap_or_else(Isa::detect);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let silu = std::env::var("EDGEPACK_ACT").is_ok_and(|v| v == "silu");
    let mut cases = Vec::new();
    for ly in LAYERS.iter().filter(|ly| ly.name.contains(&filter)) {
        let group = if ly.depthwise { ly.c_in } else { 1 };
        let p = ly.k / 2;
        let spec = FConvSpec {
            geom: ConvGeometry {
                c_in: ly.c_in,
                c_out: ly.c_out,
                group,
                kernel: [ly.k; 2],
                stride: [ly.stride; 2],
                dilation: [1, 1],
                pads: [p; 4],
            },
            weights: (0..ly.c_out * ly.c_in / group * ly.k * ly.k).map(|_| rnd()).collect(),
            bias: Some((0..ly.c_out).map(|_| rnd()).collect()),
            clamp: [0.0, 6.0],
            act: if silu { Act::Silu } else { Act::None },
            affine: None,
        };
        let conv = FConv::new(spec, isa).expect("layer");
        let [h, w] = ly.hw;
        let (oh, ow) = conv.output_hw(h, w).expect("fits");
        let x: Vec<f32> = (0..h * w * ly.c_in).map(|_| rnd()).collect();
        let y = vec![0f32; oh * ow * ly.c_out];
        let macs = oh * ow * ly.c_out * ly.c_in / group * ly.k * ly.k;
        cases.push((ly.name, conv, x, y, [h, w], macs, Vec::new()));
    }
    // `cold`: caches flushed before every timed run; `warm`: each timed run right after an untimed one;
    // default: layers interleaved (each run finds what the other layers left in the caches).
    let mode = std::env::var("EDGEPACK_BENCH_CACHE").unwrap_or_default();
    let mut junk = if mode == "cold" { vec![0u8; 256 << 20] } else { Vec::new() };
    for run in 0..runs {
        for (_, conv, x, y, [h, w], _, times) in cases.iter_mut() {
            for v in junk.iter_mut().step_by(64) {
                *v = v.wrapping_add(run as u8);
            }
            if mode == "warm" {
                conv.run(x, 1, *h, *w, y).expect("run");
            }
            let t = Instant::now();
            edgepack_runtime::kernels::with_threads(threads, || conv.run(x, 1, *h, *w, y)).expect("run");
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("{} ({} runs, {} thread(s))", isa.name(), runs, threads);
    println!("{:<28} {:>9} {:>9}", "layer", "p50 ms", "GMAC/s");
    for (name, _, _, _, _, macs, times) in cases.iter_mut() {
        times.sort_by(f64::total_cmp);
        let p50 = times[times.len() / 2];
        println!("{name:<28} {p50:>9.4} {:>9.1}", *macs as f64 / p50 / 1e6);
    }
}
