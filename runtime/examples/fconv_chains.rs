//! Times convolution chains (`kernels::fconv::FChain`: a 1×1 expansion, a depthwise convolution, a 1×1 projection
//! run row by row) against the same convolutions one after the other, on the inverted-residual blocks of
//! EfficientNet-Lite0 and the depthwise-separable pairs of the UltraFace detector: the measurement behind
//! `FUSE_BYTES`, the size of the wide tensor from which the runtime fuses. Rounds alternate between the two ways
//! and the blocks; medians. A tool for kernel work, not a target:
//! `cargo run --release --example fconv_chains [-- FILTER [RUNS]]`.
//! `EDGEPACK_THREADS=N` (default 1); `EDGEPACK_BENCH_CACHE=warm|cold` runs each block on warm or flushed caches
//! (default: blocks interleaved, each run finding what the others left in the caches, as in a model).
use std::time::Instant;

use edgepack_runtime::kernels::fconv::{Act, FChain, FConv, FConvSpec};
use edgepack_runtime::kernels::{ConvGeometry, Isa};

/// `[h, c_in, expansion (0: none), c_out (0: no projection), k, stride]`.
const BLOCKS: &[(&str, [usize; 6])] = &[
    ("effnet b0 dw3 32 +pw16 @112", [112, 32, 0, 16, 3, 1]),
    ("effnet b1 16>96 dw3/2 >24 @112", [112, 16, 96, 24, 3, 2]),
    ("effnet b2 24>144 dw3 >24 @56", [56, 24, 144, 24, 3, 1]),
    ("effnet b3 24>144 dw5/2 >40 @56", [56, 24, 144, 40, 5, 2]),
    ("effnet b4 40>240 dw5 >40 @28", [28, 40, 240, 40, 5, 1]),
    ("effnet b5 40>240 dw3/2 >80 @28", [28, 40, 240, 80, 3, 2]),
    ("effnet b6 80>480 dw3 >80 @14", [14, 80, 480, 80, 3, 1]),
    ("effnet b9 80>480 dw5 >112 @14", [14, 80, 480, 112, 5, 1]),
    ("effnet b12 192>1152 dw5 >192 @7", [7, 192, 1152, 192, 5, 1]),
    ("ultraface dw3 16 +pw32 @120", [120, 16, 0, 32, 3, 1]),
    ("ultraface dw3/2 32 +pw64 @120", [120, 32, 0, 64, 3, 2]),
    ("ultraface dw3 64 +pw64 @60", [60, 64, 0, 64, 3, 1]),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let threads: usize = std::env::var("EDGEPACK_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let isa = Isa::detect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let spec = |rnd: &mut dyn FnMut() -> f32, c_in: usize, c_out: usize, k: usize, stride: usize, dw: bool| {
        let group = if dw { c_in } else { 1 };
        FConvSpec {
            geom: ConvGeometry {
                c_in,
                c_out,
                group,
                kernel: [k; 2],
                stride: [stride; 2],
                dilation: [1, 1],
                pads: [k / 2; 4],
            },
            weights: (0..c_out * c_in / group * k * k).map(|_| rnd() * 0.5).collect(),
            bias: Some((0..c_out).map(|_| rnd()).collect()),
            clamp: if dw || c_out > c_in { [0.0, 6.0] } else { [f32::NEG_INFINITY, f32::INFINITY] },
            act: Act::None,
            affine: None,
        }
    };
    struct Case {
        name: &'static str,
        convs: Vec<FConv>,
        chain: FChain,
        x: Vec<f32>,
        hw: usize,
        out: usize,
        /// The tensors between the convolutions run one after the other (allocated once, as a model's arena).
        bufs: std::cell::RefCell<Vec<Vec<f32>>>,
        times: [Vec<f64>; 2],
    }
    let mut cases = Vec::new();
    for &(name, [h, c_in, cm, c_out, k, s]) in BLOCKS.iter().filter(|(n, _)| n.contains(&filter)) {
        let mut specs = Vec::new();
        if cm > 0 {
            specs.push(spec(&mut rnd, c_in, cm, 1, 1, false));
        }
        let mid = if cm > 0 { cm } else { c_in };
        specs.push(spec(&mut rnd, mid, mid, k, s, true));
        if c_out > 0 {
            specs.push(spec(&mut rnd, mid, c_out, 1, 1, false));
        }
        let convs: Vec<FConv> = specs.iter().map(|s| FConv::new(s.clone(), isa).expect("conv")).collect();
        let chain = FChain::new(specs.into_iter().map(|s| FConv::new(s, isa).expect("conv")).collect())
            .expect("chain")
            .fuse_from(0);
        let (oh, ow) = chain.output_hw(h, h).expect("fits");
        let x: Vec<f32> = (0..h * h * c_in).map(|_| rnd()).collect();
        let mut hw = (h, h);
        let bufs = convs
            .iter()
            .map(|conv| {
                hw = conv.output_hw(hw.0, hw.1).expect("fits");
                vec![0f32; hw.0 * hw.1 * conv.spec().geom.c_out]
            })
            .collect();
        let (out, bufs) = (oh * ow * chain.c_out(), std::cell::RefCell::new(bufs));
        cases.push(Case { name, convs, chain, x, hw: h, out, bufs, times: [vec![], vec![]] });
    }
    let one_after_the_other = |c: &Case| {
        let mut bufs = c.bufs.borrow_mut();
        let mut hw = (c.hw, c.hw);
        for (i, conv) in c.convs.iter().enumerate() {
            let (done, rest) = bufs.split_at_mut(i);
            let input = done.last().map_or(&c.x[..], |b| &b[..]);
            conv.run(input, 1, hw.0, hw.1, &mut rest[0]).expect("run");
            hw = conv.output_hw(hw.0, hw.1).expect("fits");
        }
    };
    let mode = std::env::var("EDGEPACK_BENCH_CACHE").unwrap_or_default();
    let mut junk = if mode == "cold" { vec![0u8; 256 << 20] } else { Vec::new() };
    let mut y = Vec::new();
    for run in 0..runs {
        for c in cases.iter_mut() {
            for way in 0..2 {
                for v in junk.iter_mut().step_by(64) {
                    *v = v.wrapping_add(run as u8);
                }
                let go = |c: &Case, y: &mut Vec<f32>| {
                    edgepack_runtime::kernels::with_threads(threads, || {
                        if way == 0 {
                            one_after_the_other(c)
                        } else {
                            y.resize(c.out, 0.0);
                            c.chain.run(&c.x, [1, c.hw, c.hw], None, y).expect("run");
                        }
                    })
                };
                if mode == "warm" {
                    go(c, &mut y);
                }
                let t = Instant::now();
                go(c, &mut y);
                c.times[way].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!(
        "{} ({} runs, {} thread(s), caches {})",
        isa.name(),
        runs,
        threads,
        if mode.is_empty() { "as left" } else { &mode }
    );
    println!("{:<34} {:>12} {:>9} {:>7} {:>6}", "block", "one by one", "chain", "ratio", "fuses");
    for c in cases.iter_mut() {
        let [a, b] = c.times.each_mut().map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        });
        let fuses = FChain::new(c.convs.drain(..).collect()).expect("chain").fuses([1, c.hw, c.hw]);
        println!("{:<34} {a:>9.3} ms {b:>6.3} ms {:>7.2} {:>6}", c.name, b / a, if fuses { "yes" } else { "no" });
    }
}
