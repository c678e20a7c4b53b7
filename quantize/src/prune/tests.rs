use std::collections::BTreeMap;

use edgepack_runtime::onnx::builder::{attr_int, attr_ints, model, tensor_f32, tensor_i64, value_info};
use edgepack_runtime::onnx::{Dim, Model, node};
use edgepack_runtime::{Device, Session, SessionOptions, Tensor};

use super::channels::{Groups, Use};
use super::stats::{Channel, ChannelStats};
use super::*;

fn opts() -> SessionOptions {
    SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() }
}

/// Deterministic pseudo-random weights.
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 2001) as f32 / 1000.0 - 1.0) * 0.5
        })
        .collect()
}

/// x\[1,3,8,8\] → a: Conv 3→8 (3×3) → Relu → dw: depthwise 8 → Clip(0,6) → b: Conv 8→6 (1×1),
/// plus c: Conv x 3→6 (1×1) (the residual Add ties b and c) → Relu → Concat(·, d: Conv x 3→4) → e: Conv 10→5
/// (1×1) → Relu → GlobalAveragePool → Flatten → fc: Gemm 5→3 → y.
///
/// `zero`: (conv, channel, bias) filters set to zero with that bias.
fn net(zero: &[(&str, usize, f32)]) -> Model {
    type Params = (Vec<i64>, Vec<f32>, Vec<f32>);
    let mut w: BTreeMap<&str, Params> = BTreeMap::new();
    let shapes: [(&str, [i64; 4]); 6] = [
        ("a", [8, 3, 3, 3]),
        ("dw", [8, 1, 3, 3]),
        ("b", [6, 8, 1, 1]),
        ("c", [6, 3, 1, 1]),
        ("d", [4, 3, 1, 1]),
        ("e", [5, 10, 1, 1]),
    ];
    for (i, (name, dims)) in shapes.iter().enumerate() {
        let n: i64 = dims.iter().product();
        let b = rnd(dims[0] as usize, 100 + i as u64).iter().map(|v| v * 0.2).collect();
        w.insert(name, (dims.to_vec(), rnd(n as usize, i as u64 + 1), b));
    }
    for &(conv, ch, bias) in zero {
        let (dims, wv, bv) = w.get_mut(conv).unwrap();
        let per: i64 = dims[1..].iter().product();
        for x in &mut wv[ch * per as usize..(ch + 1) * per as usize] {
            *x = 0.0;
        }
        bv[ch] = bias;
    }
    let mut inits = vec![];
    for (name, (dims, wv, bv)) in &w {
        inits.push(tensor_f32(&format!("{name}_w"), dims, wv));
        inits.push(tensor_f32(&format!("{name}_b"), &[dims[0]], bv));
    }
    inits.push(tensor_f32("fc_w", &[3, 5], &rnd(15, 77)));
    inits.push(tensor_f32("fc_b", &[3], &[0.1, 0.0, -0.1]));
    inits.push(tensor_f32("lo", &[], &[0.0]));
    inits.push(tensor_f32("hi", &[], &[6.0]));
    inits.push(tensor_i64("flat", &[2], &[1, -1]));
    let conv = |name: &str, x: &str, y: &str, k: i64, group: i64| {
        let mut attrs = vec![attr_ints("kernel_shape", &[k, k]), attr_ints("pads", &[(k - 1) / 2; 4])];
        if group > 1 {
            attrs.push(attr_int("group", group));
        }
        node("Conv", name, &[x, &format!("{name}_w"), &format!("{name}_b")], &[y], attrs)
    };
    model(
        vec![
            conv("a", "x", "a_out", 3, 1),
            node("Relu", "a_relu", &["a_out"], &["a_act"], vec![]),
            conv("dw", "a_act", "dw_out", 3, 8),
            node("Clip", "dw_clip", &["dw_out", "lo", "hi"], &["dw_act"], vec![]),
            conv("b", "dw_act", "b_out", 1, 1),
            conv("c", "x", "c_out", 1, 1),
            node("Add", "res", &["b_out", "c_out"], &["sum"], vec![]),
            node("Relu", "sum_relu", &["sum"], &["sum_act"], vec![]),
            conv("d", "x", "d_out", 1, 1),
            node("Concat", "cat", &["sum_act", "d_out"], &["cat_out"], vec![attr_int("axis", 1)]),
            conv("e", "cat_out", "e_out", 1, 1),
            node("Relu", "e_relu", &["e_out"], &["e_act"], vec![]),
            node("GlobalAveragePool", "gap", &["e_act"], &["pooled"], vec![]),
            node("Reshape", "flatten", &["pooled", "flat"], &["feat"], vec![]),
            node("Gemm", "fc", &["feat", "fc_w", "fc_b"], &["y"], vec![attr_int("transB", 1)]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)])],
        vec![value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(3)])],
        inits,
    )
}

fn input() -> Tensor {
    Tensor::from_f32(vec![1, 3, 8, 8], rnd(192, 9).iter().map(|v| v * 2.0).collect()).unwrap()
}

fn run(m: &Model) -> Vec<f32> {
    let s = Session::from_model(m, &opts()).unwrap();
    s.run(vec![("x".into(), input())]).unwrap()[0].1.to_f32_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Statistics of every Conv/Gemm input on the one test input.
fn stats_of(m: &Model) -> ChannelStats {
    let s = Session::from_model(m, &opts()).unwrap();
    let names = ["x", "a_act", "dw_act", "cat_out", "feat"];
    let outs = s.run_values(vec![("x".into(), input())], &names).unwrap();
    let mut st = ChannelStats::default();
    for (n, t) in outs {
        let sh = t.shape().to_vec();
        let (c, inner) = (sh[1], sh[2..].iter().product::<usize>());
        let v = t.to_f32_vec();
        let mean = (0..c).map(|k| v[k * inner..(k + 1) * inner].iter().sum::<f32>() / inner as f32).collect();
        let mean_abs =
            (0..c).map(|k| v[k * inner..(k + 1) * inner].iter().map(|x| x.abs()).sum::<f32>() / inner as f32).collect();
        let mut second = vec![0f64; c * c];
        for p in 0..inner {
            for i in 0..c {
                for j in 0..c {
                    second[i * c + j] += v[i * inner + p] as f64 * v[j * inner + p] as f64 / inner as f64;
                }
            }
        }
        st.0.insert(n, Channel { mean, mean_abs, shape: sh, second, second_samples: inner as u64 });
    }
    st
}

fn group<'a>(g: &'a Groups, name: &str) -> (usize, &'a channels::Group) {
    let i = g.by_name(name).unwrap_or_else(|| panic!("no group {name}: {g:?}"));
    (i, &g.groups[i])
}

#[test]
fn groups_follow_depthwise_residual_concat_and_pooling() {
    let m = net(&[]);
    let g = Groups::analyze(&m);
    let (_, a) = group(&g, "a");
    assert!(a.prunable(), "{a:?}");
    assert!(a.uses.iter().any(|u| matches!(u, Use::Depthwise { .. })));
    assert!(a.uses.iter().any(|u| matches!(u, Use::ConvInput { offset: 0, .. })));
    // b and c are tied through the residual Add: one group with two sources.
    let (_, b) = group(&g, "b");
    assert_eq!(b.sources, vec!["b", "c"]);
    assert!(b.prunable() && g.by_name("c").is_none());
    // d sits after b/c in the Concat: offset 6 in e's input channels.
    let (_, d) = group(&g, "d");
    assert!(d.uses.contains(&Use::ConvInput { node: 10, offset: 6 }), "{:?}", d.uses);
    // e reaches the Gemm through global pooling and a flatten.
    let (_, e) = group(&g, "e");
    assert!(e.prunable() && e.uses.iter().any(|u| matches!(u, Use::GemmInput { offset: 0, .. })));
}

#[test]
fn blocked_groups_are_never_pruned() {
    // A Conv output that is a graph output, and a grouped (non-depthwise) Conv reader.
    let m = model(
        vec![
            node("Conv", "p", &["x", "pw"], &["p_out"], vec![]),
            node("Conv", "q", &["p_out", "qw"], &["y"], vec![attr_int("group", 2)]),
            node("Conv", "r", &["x", "pw"], &["y2"], vec![]),
        ],
        vec![value_info("x", 1, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(4), Dim::Fixed(4)])],
        vec![
            value_info("y", 1, &[Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4), Dim::Fixed(4)]),
            value_info("y2", 1, &[Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(4), Dim::Fixed(4)]),
        ],
        vec![tensor_f32("pw", &[4, 2, 1, 1], &rnd(8, 1)), tensor_f32("qw", &[4, 2, 1, 1], &rnd(8, 2))],
    );
    let g = Groups::analyze(&m);
    let (pi, p) = group(&g, "p");
    assert!(p.blocked.as_deref().unwrap().contains("grouped Conv"), "{p:?}");
    assert!(g.by_name("q").is_none(), "a grouped Conv's outputs are not a group");
    assert!(group(&g, "r").1.blocked.as_deref().unwrap().contains("graph output"));
    assert!(g.prune(&m, &BTreeMap::from([(pi, vec![0])]), None).is_err());
}

#[test]
fn removing_dead_channels_is_exact_everywhere() {
    // Channel 2 of `a` (before a Relu, through the depthwise), channel 1 of the tied b+c, channel 3 of `e`
    // (before the pooling and the Gemm): all produce zeros.
    let m = net(&[("a", 2, 0.0), ("dw", 2, 0.0), ("b", 1, 0.0), ("c", 1, 0.0), ("e", 3, -1.0)]);
    let reference = run(&m);
    let g = Groups::analyze(&m);
    let mut remove = BTreeMap::new();
    for (name, ch) in [("a", 2), ("b", 1), ("e", 3)] {
        remove.insert(group(&g, name).0, vec![ch]);
    }
    let pruned = g.prune(&m, &remove, None).unwrap();
    assert!(max_diff(&run(&pruned), &reference) < 1e-5);
    let w = |m: &Model, n: &str| m.graph.initializer(n).unwrap().dims.clone();
    assert_eq!(w(&pruned, "a_w"), vec![7, 3, 3, 3]);
    assert_eq!(w(&pruned, "dw_w"), vec![7, 1, 3, 3]);
    assert_eq!(w(&pruned, "b_w"), vec![5, 7, 1, 1]);
    assert_eq!(w(&pruned, "c_w"), vec![5, 3, 1, 1]);
    assert_eq!(w(&pruned, "e_w"), vec![4, 9, 1, 1]);
    assert_eq!(w(&pruned, "fc_w"), vec![3, 4]);
    let dw = pruned.graph.nodes.iter().find(|n| n.name.as_deref() == Some("dw")).unwrap();
    assert_eq!(dw.attr_i("group"), Some(7));
}

#[test]
fn bias_correction_absorbs_a_constant_channel() {
    // d's channel 0 is the constant -1: e reads it through a 1×1 Conv, so moving its mean into e's bias is exact.
    let m = net(&[("d", 0, -1.0)]);
    let reference = run(&m);
    let g = Groups::analyze(&m);
    let remove = BTreeMap::from([(group(&g, "d").0, vec![0])]);
    let st = stats_of(&m);
    let repaired = g.prune(&m, &remove, Some(&st)).unwrap();
    assert!(max_diff(&run(&repaired), &reference) < 1e-5);
    let plain = g.prune(&m, &remove, None).unwrap();
    assert!(max_diff(&run(&plain), &reference) > 1e-3, "the test channel must matter without repair");
}

#[test]
fn least_squares_rebuilds_a_redundant_channel() {
    // d's channel 0 is exactly twice its channel 1 (no activation before the Concat): with second moments the
    // consumer e takes it over from channel 1 and the output is unchanged.
    let mut m = net(&[]);
    let t = m.graph.initializer("d_w").unwrap().clone();
    let mut w = edgepack_runtime::onnx::passes::tensor_f32_values(&t).unwrap();
    for k in 0..3 {
        w[k] = 2.0 * w[3 + k];
    }
    m.graph.set_initializer(tensor_f32("d_w", &[4, 3, 1, 1], &w));
    let mut b = edgepack_runtime::onnx::passes::tensor_f32_values(m.graph.initializer("d_b").unwrap()).unwrap();
    b[0] = 2.0 * b[1];
    m.graph.set_initializer(tensor_f32("d_b", &[4], &b));
    let reference = run(&m);
    let g = Groups::analyze(&m);
    let remove = BTreeMap::from([(group(&g, "d").0, vec![0])]);
    let st = stats_of(&m);
    let rebuilt = g.prune(&m, &remove, Some(&st)).unwrap();
    assert!(max_diff(&run(&rebuilt), &reference) < 1e-4, "{}", max_diff(&run(&rebuilt), &reference));
    let mut means_only = st.clone();
    means_only.0.values_mut().for_each(|c| c.second.clear());
    let corrected = g.prune(&m, &remove, Some(&means_only)).unwrap();
    assert!(max_diff(&run(&corrected), &reference) > 1e-3);
    // The reconstruction criterion sees that channel 0 (or 1) of d is redundant: it goes first.
    let d = group(&g, "d").0;
    let score = g.importance(&m, d, Criterion::Reconstruction, Some(&st), &Default::default()).unwrap();
    let lowest = channels::lowest(&score, 3);
    assert!(lowest == vec![0] || lowest == vec![1], "{score:?}");
}

#[test]
fn pruner_builds_every_uniform_ratio_and_the_model_still_runs() {
    let m = net(&[]);
    let st = stats_of(&m);
    let bn = Default::default();
    for criterion in [Criterion::L1, Criterion::L2, Criterion::Contribution, Criterion::Reconstruction] {
        let p = Pruner::new(&m, Method::Structured { criterion, multiple: 1 }, Some(&st), &bn, true).unwrap();
        assert_eq!(p.knobs(), vec!["a", "b", "d", "e"]);
        for r in [0.0, 0.25, 0.5, 0.9] {
            let out = p.build(&p.uniform(r).unwrap()).unwrap();
            let y = run(&out);
            assert_eq!(y.len(), 3);
            assert!(y.iter().all(|v| v.is_finite()));
        }
    }
    let p = Pruner::new(&m, Method::Structured { criterion: Criterion::BnScale, multiple: 1 }, None, &bn, true);
    assert!(p.is_err(), "bn-scale without BatchNormalization must say so");
}

#[test]
fn magnitude_pruning_zeroes_the_smallest_weights_and_corrects_biases() {
    let m = net(&[]);
    let targets = magnitude::global_targets(&m, 0.5).unwrap();
    assert_eq!(targets.len(), 7);
    let pruned = magnitude::prune(&m, &targets, None).unwrap();
    let s = magnitude::sparsity(&pruned);
    assert!((s - 0.5).abs() < 0.01, "{s}");
    // Shapes untouched, model runs.
    assert_eq!(run(&pruned).len(), 3);
    // Per layer: exactly the fraction asked, the largest weights kept.
    let one = BTreeMap::from([("e".to_string(), 0.3)]);
    let p = magnitude::prune(&m, &one, None).unwrap();
    let w0 = edgepack_runtime::onnx::passes::tensor_f32_values(m.graph.initializer("e_w").unwrap()).unwrap();
    let w1 = edgepack_runtime::onnx::passes::tensor_f32_values(p.graph.initializer("e_w").unwrap()).unwrap();
    assert_eq!(w1.iter().filter(|v| **v == 0.0).count(), 15);
    let kept_min = w1.iter().filter(|v| **v != 0.0).map(|v| v.abs()).fold(f32::INFINITY, f32::min);
    let dropped_max = w0.iter().zip(&w1).filter(|(_, b)| **b == 0.0).map(|(a, _)| a.abs()).fold(0.0, f32::max);
    assert!(dropped_max <= kept_min);
    // Bias correction (layers OBS does not take: here the 3×3 Conv `a`): each output channel's mean moves back
    // towards the original (exactly but for the zero padding, which on an 8×8 input touches most positions).
    let st = stats_of(&m);
    let a30 = BTreeMap::from([("a".to_string(), 0.3)]);
    let corrected = magnitude::prune(&m, &a30, Some(&st)).unwrap();
    let uncorrected = magnitude::prune(&m, &a30, None).unwrap();
    let mean_a = |m: &Model| {
        let s = Session::from_model(m, &opts()).unwrap();
        let t = s.run_values(vec![("x".into(), input())], &["a_out"]).unwrap().remove(0).1;
        let v = t.to_f32_vec();
        (0..8).map(|c| v[c * 64..(c + 1) * 64].iter().sum::<f32>() / 64.0).collect::<Vec<_>>()
    };
    let (d_fix, d_raw) = (max_diff(&mean_a(&corrected), &mean_a(&m)), max_diff(&mean_a(&uncorrected), &mean_a(&m)));
    assert!(d_fix < 0.8 * d_raw, "corrected {d_fix} vs uncorrected {d_raw}");
}

#[test]
fn optimal_brain_surgeon_beats_plain_magnitude_on_a_1x1_conv() {
    let m = net(&[]);
    let st = stats_of(&m);
    let half = BTreeMap::from([("e".to_string(), 0.5)]);
    let e_out = |m: &Model| {
        let s = Session::from_model(m, &opts()).unwrap();
        s.run_values(vec![("x".into(), input())], &["e_out"]).unwrap().remove(0).1.to_f32_vec()
    };
    let reference = e_out(&m);
    let err = |m: &Model| e_out(m).iter().zip(&reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    let obs = magnitude::prune(&m, &half, Some(&st)).unwrap();
    let plain = magnitude::prune(&m, &half, None).unwrap();
    let w = edgepack_runtime::onnx::passes::tensor_f32_values(obs.graph.initializer("e_w").unwrap()).unwrap();
    assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 25);
    assert!(err(&obs) < 0.5 * err(&plain), "obs {} vs magnitude {}", err(&obs), err(&plain));
}

#[test]
fn structured_pruning_reduces_macs() {
    let m = net(&[]);
    let st = stats_of(&m);
    let pos = conv_positions(&m, &st);
    assert_eq!(pos.get("a"), Some(&64));
    let bn = Default::default();
    let p =
        Pruner::new(&m, Method::Structured { criterion: Criterion::L1, multiple: 1 }, Some(&st), &bn, true).unwrap();
    let half = p.build(&p.uniform(0.5).unwrap()).unwrap();
    let (before, after) = (total_macs(&m, &pos), total_macs(&half, &pos));
    assert!(after * 2 < before + before / 4, "{after} vs {before}");
    // The kernels' work: every layer here has at most 16 outputs, so each is padded to one 16-lane tile.
    let expected: u64 = layer_costs(&m, &pos)
        .iter()
        .map(|(name, c)| {
            let n = m.graph.nodes.iter().find(|n| n.name() == name).unwrap();
            let dims = &m.graph.initializer(&n.input[1]).unwrap().dims;
            let outs = dims[0] as u64; // Conv weights, and the transB Gemm's [3, 5]
            c.0 / outs * super::KERNEL_TILE as u64
        })
        .sum();
    assert_eq!(kernel_macs(&m, &pos), expected);
    assert!(kernel_macs(&half, &pos) < expected);
}

#[test]
fn replicated_latency_builds_sessions_per_replica_and_bounds_the_ratio() {
    let m = net(&[]);
    let built = std::cell::Cell::new(0);
    let make = || {
        built.set(built.get() + 1);
        Ok(Session::from_model(&m, &opts())?)
    };
    let inputs = vec![vec![("x".to_string(), input())]];
    let mut steps = 0;
    let l = crate::fidelity::replicated_latency_ms(make, make, &inputs, 4, 10, |d| steps = d).unwrap();
    // 4 replicas × ⌈10 / 4⌉ pairs, two fresh sessions per replica.
    assert_eq!((l.pairs, steps, built.get()), (12, 12, 8));
    assert_eq!(l.replica_ratios.len(), 4);
    assert!((l.ci_level - 0.875).abs() < 1e-12);
    let (lo, hi) = l.ratio_ci;
    assert!(lo <= l.ratio && l.ratio <= hi && lo > 0.0 && hi.is_finite());
    assert!(l.replica_ratios.iter().all(|r| (lo..=hi).contains(r)));
    assert!(crate::fidelity::replicated_latency_ms(make, make, &[], 2, 4, |_| {}).is_err());
}

#[test]
fn order_statistic_interval_is_the_exact_binomial_one() {
    use crate::fidelity::order_statistic_ci;
    // Up to 8 replicas no inner pair of ranks reaches 95 %: the extremes, at 1 - 2^(1-n).
    for n in 2..=8 {
        let (k, level) = order_statistic_ci(n, 0.95);
        assert_eq!(k, 0, "n = {n}");
        assert!((level - (1.0 - 0.5f64.powi(n as i32 - 1))).abs() < 1e-12);
    }
    // 16: P(Bin(16, 1/2) <= 3) = 697 / 65536, so ranks 4 and 13 (1-based) cover 1 - 2 * 697 / 65536; the next
    // pair inward would cover 1 - 2 * 2517 / 65536 = 92.3 % < 95 %.
    let (k, level) = order_statistic_ci(16, 0.95);
    assert_eq!(k, 3);
    assert!((level - (1.0 - 2.0 * 697.0 / 65536.0)).abs() < 1e-12);
    // 20: ranks 6 and 15 (P(Bin(20, 1/2) <= 5) = 21700 / 2^20).
    let (k, level) = order_statistic_ci(20, 0.95);
    assert_eq!(k, 5);
    assert!((level - (1.0 - 2.0 * 21700.0 / 1048576.0)).abs() < 1e-12);
    // 32 (the default): ranks 10 and 23.
    let (k, level) = order_statistic_ci(32, 0.95);
    assert_eq!(k, 9);
    assert!((level - (1.0 - 2.0 * 43081973.0 / 4294967296.0)).abs() < 1e-12);
    assert_eq!(order_statistic_ci(1, 0.95).0, 0);
}

/// Every scalable group of `m` rescaled with uneven scales (0.05 to ~2): the outputs must not move.
fn rescaled(m: &Model) -> (Groups, Model) {
    let g = Groups::analyze_scalable(m);
    let scales: BTreeMap<usize, Vec<f32>> =
        g.prunable().map(|(i, grp)| (i, (0..grp.channels).map(|c| 0.05 + 0.37 * c as f32).collect())).collect();
    let eq = g.rescale(m, &scales).unwrap();
    (g, eq)
}

#[test]
fn channel_scales_pass_homogeneous_ops_only_and_keep_the_function() {
    let m = net(&[]);
    let (g, eq) = rescaled(&m);
    // `a` reaches a Clip (not homogeneous): blocked here, though pruning may cut it.
    assert!(group(&g, "a").1.blocked.as_deref().is_some_and(|w| w.contains("Clip")), "{g:?}");
    assert!(Groups::analyze(&m).by_name("a").is_some_and(|i| Groups::analyze(&m).groups[i].blocked.is_none()));
    // The residual pair (b + c → Relu → Concat), d (→ Concat) and e (→ Relu → pool → Gemm) scale.
    for name in ["b", "d", "e"] {
        assert!(group(&g, name).1.prunable(), "{name}: {g:?}");
    }
    assert!(max_diff(&run(&m), &run(&eq)) < 1e-5);
    // The weights did move: e's filters were divided, fc's columns multiplied.
    let w = |m: &Model, n: &str| {
        let t = m.graph.nodes.iter().find(|x| x.name() == n).unwrap().input[1].clone();
        edgepack_runtime::onnx::passes::tensor_f32_values(m.graph.initializer(&t).unwrap()).unwrap()
    };
    assert!(max_diff(&w(&m, "e"), &w(&eq, "e")) > 0.1 && max_diff(&w(&m, "fc"), &w(&eq, "fc")) > 0.01);

    // With a Relu in place of the Clip, `a` scales too, through the depthwise Conv (whose bias follows).
    let mut r = net(&[]);
    let clip = r.graph.nodes.iter_mut().find(|n| n.name() == "dw_clip").unwrap();
    clip.op_type = Some("Relu".into());
    clip.input.truncate(1);
    let (g, eq) = rescaled(&r);
    let (_, a) = group(&g, "a");
    assert!(a.prunable() && a.uses.iter().any(|u| matches!(u, Use::Depthwise { .. })), "{a:?}");
    assert!(max_diff(&run(&r), &run(&eq)) < 1e-5);
    // A product of two activations stops a scale: x·x is not homogeneous.
    let mut sq = net(&[]);
    let res = sq.graph.nodes.iter_mut().find(|n| n.name() == "res").unwrap();
    res.op_type = Some("Mul".into());
    let g = Groups::analyze_scalable(&sq);
    assert!(group(&g, "b").1.blocked.as_deref().is_some_and(|w| w.contains("Mul")), "{g:?}");
}
