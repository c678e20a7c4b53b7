//! Recurrent layers: LSTM, GRU and RNN (forward, reverse, bidirectional; sequence_lens; initial states;
//! peepholes; clip; custom activations; both layouts), in f64 with one rounding at the end.
use super::math::f64s;
use super::*;

type Act = Box<dyn Fn(f64) -> f64>;

/// An activation by its ONNX name with its alpha/beta.
fn activation(name: &str, alpha: Option<f64>, beta: Option<f64>) -> Res<Act> {
    let (al, be) = (alpha, beta);
    Ok(match name.to_ascii_lowercase().as_str() {
        "sigmoid" => Box::new(|v: f64| 1.0 / (1.0 + (-v).exp())),
        "tanh" => Box::new(f64::tanh),
        "relu" => Box::new(|v: f64| v.max(0.0)),
        "leakyrelu" => {
            let a = al.unwrap_or(0.01);
            Box::new(move |v: f64| if v < 0.0 { a * v } else { v })
        }
        "thresholdedrelu" => {
            let a = al.unwrap_or(1.0);
            Box::new(move |v: f64| if v > a { v } else { 0.0 })
        }
        "hardsigmoid" => {
            let (a, b) = (al.unwrap_or(0.2), be.unwrap_or(0.5));
            Box::new(move |v: f64| (a * v + b).clamp(0.0, 1.0))
        }
        "affine" => {
            let (a, b) = (al.unwrap_or(1.0), be.unwrap_or(0.0));
            Box::new(move |v: f64| a * v + b)
        }
        "scaledtanh" => {
            let (a, b) = (al.unwrap_or(1.0), be.unwrap_or(1.0));
            Box::new(move |v: f64| a * (b * v).tanh())
        }
        "elu" => {
            let a = al.unwrap_or(1.0);
            Box::new(move |v: f64| if v < 0.0 { a * (v.exp() - 1.0) } else { v })
        }
        "softsign" => Box::new(|v: f64| v / (1.0 + v.abs())),
        "softplus" => Box::new(|v: f64| v.exp().ln_1p()),
        other => return Err(format!("activation {other}")),
    })
}

/// The node's activations for `dirs` directions, `per_dir` each (defaults when the attribute is absent).
fn activations(n: &NodeProto, dirs: usize, defaults: &[&str]) -> Res<Vec<Act>> {
    let names: Vec<String> = match n.attr("activations") {
        Some(a) if !a.strings.is_empty() => a.strings.iter().map(|s| String::from_utf8_lossy(s).to_string()).collect(),
        _ => (0..dirs).flat_map(|_| defaults.iter().map(|s| s.to_string())).collect(),
    };
    let alphas = n.attr("activation_alpha").map(|a| a.floats.clone()).unwrap_or_default();
    let betas = n.attr("activation_beta").map(|a| a.floats.clone()).unwrap_or_default();
    names
        .iter()
        .enumerate()
        .map(|(i, s)| activation(s, alphas.get(i).map(|&x| x as f64), betas.get(i).map(|&x| x as f64)))
        .collect()
}

/// y[r] += Σ_k x[k]·w[r·cols + k] for each row r of w (rows × cols).
fn matvec_add(y: &mut [f64], w: &[f64], x: &[f64]) {
    let cols = x.len();
    for (r, yr) in y.iter_mut().enumerate() {
        *yr += w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
    }
}

pub(crate) fn op_rnn(a: &Args) -> Res<Vec<Tensor>> {
    let n = a.n;
    let kind = n.op();
    let gates = match kind {
        "LSTM" => 4,
        "GRU" => 3,
        _ => 1,
    };
    let x = a.x()?;
    let (w, r) = (input(a.ins, 1)?, input(a.ins, 2)?);
    let opt = |i: usize| a.ins.get(i).copied().flatten();
    let layout = n.attr_i("layout").unwrap_or(0);
    let xs = x.shape();
    if xs.len() != 3 {
        return Err(format!("{kind} input of rank {}", xs.len()));
    }
    let (seq, batch, isz) = if layout == 0 { (xs[0], xs[1], xs[2]) } else { (xs[1], xs[0], xs[2]) };
    let (ws, rs) = (w.shape(), r.shape());
    if ws.len() != 3 || rs.len() != 3 {
        return Err(format!("{kind} weights of ranks {} and {} (3 expected)", ws.len(), rs.len()));
    }
    let dirs = ws[0];
    let hidden = rs[2];
    let direction = n.attr_s("direction").unwrap_or("forward");
    if (direction == "bidirectional") != (dirs == 2) || dirs == 0 || dirs > 2 {
        return Err(format!("direction {direction} with {dirs} weight sets"));
    }
    if n.attr_i("hidden_size").is_some_and(|h| h != hidden as i64) {
        return Err(format!("{kind} hidden_size {:?} but R has {hidden} columns", n.attr_i("hidden_size")));
    }
    // Every optional input's shape, before any indexing (the spec's shapes; `layout` 1 swaps batch and dirs).
    let state = if layout == 0 { vec![dirs, batch, hidden] } else { vec![batch, dirs, hidden] };
    let want: [(&str, Option<&Tensor>, Vec<usize>); 7] = [
        ("W", Some(w), vec![dirs, gates * hidden, isz]),
        ("R", Some(r), vec![dirs, gates * hidden, hidden]),
        ("B", opt(3), vec![dirs, 2 * gates * hidden]),
        ("sequence_lens", opt(4), vec![batch]),
        ("initial_h", opt(5), state.clone()),
        ("initial_c", opt(6), state),
        ("P", opt(7), vec![dirs, 3 * hidden]),
    ];
    for (name, t, shape) in want {
        if let Some(t) = t
            && t.shape() != shape.as_slice()
        {
            return Err(format!("{kind} input {name} has shape {:?}, expected {shape:?}", t.shape()));
        }
    }
    let clip = n.attr_f("clip").map(|c| c as f64);
    let input_forget = n.attr_i("input_forget").unwrap_or(0) != 0;
    let lbr = n.attr_i("linear_before_reset").unwrap_or(0) != 0;
    let defaults: &[&str] = match kind {
        "LSTM" => &["Sigmoid", "Tanh", "Tanh"],
        "GRU" => &["Sigmoid", "Tanh"],
        _ => &["Tanh"],
    };
    let acts = activations(n, dirs, defaults)?;
    let per = defaults.len();
    if acts.len() < dirs * per {
        return Err(format!("{kind}: {} activations for {dirs} directions of {per}", acts.len()));
    }
    let (xv, wv, rv) = (f64s(x), f64s(w), f64s(r));
    let bv = opt(3).map(f64s).unwrap_or_else(|| vec![0.0; dirs * 2 * gates * hidden]);
    let lens: Vec<usize> = match opt(4) {
        Some(t) => i64s(&t.cast(DType::I64))?.iter().map(|&l| l.clamp(0, seq as i64) as usize).collect(),
        None => vec![seq; batch],
    };
    let h0 = opt(5).map(f64s);
    let c0 = opt(6).map(f64s);
    let p = opt(7).map(f64s);
    let at_x = |t: usize, b: usize| if layout == 0 { (t * batch + b) * isz } else { (b * seq + t) * isz };
    let mut y = vec![0.0; checked_len(&[seq, dirs, batch, hidden])?];
    let (mut yh, mut yc) = (vec![0.0; dirs * batch * hidden], vec![0.0; dirs * batch * hidden]);
    let cl = |v: f64| clip.map_or(v, |c| v.clamp(-c, c));
    for d in 0..dirs {
        let reverse = direction == "reverse" || d == 1;
        let wd = &wv[d * gates * hidden * isz..(d + 1) * gates * hidden * isz];
        let rd = &rv[d * gates * hidden * hidden..(d + 1) * gates * hidden * hidden];
        let (wb, rb) =
            (&bv[d * 2 * gates * hidden..][..gates * hidden], &bv[(d * 2 + 1) * gates * hidden..][..gates * hidden]);
        let f = &acts[d * per];
        let g = acts.get(d * per + 1);
        let hact = acts.get(d * per + 2);
        for b in 0..batch {
            let s0 = if layout == 0 { (d * batch + b) * hidden } else { (b * dirs + d) * hidden };
            let mut h: Vec<f64> = h0.as_ref().map_or(vec![0.0; hidden], |v| v[s0..s0 + hidden].to_vec());
            let mut c: Vec<f64> = c0.as_ref().map_or(vec![0.0; hidden], |v| v[s0..s0 + hidden].to_vec());
            let len = lens[b];
            for step in 0..len {
                let t = if reverse { len - 1 - step } else { step };
                let xt = &xv[at_x(t, b)..at_x(t, b) + isz];
                let mut xw = wb.to_vec();
                matvec_add(&mut xw, wd, xt);
                let mut hr = rb.to_vec();
                matvec_add(&mut hr, rd, &h);
                match kind {
                    "LSTM" => {
                        let g = g.ok_or("LSTM needs 3 activations")?;
                        let hact = hact.ok_or("LSTM needs 3 activations")?;
                        let pp = |k: usize, j: usize| p.as_ref().map_or(0.0, |p| p[(d * 3 + k) * hidden + j]);
                        let mut next_c = vec![0.0; hidden];
                        for j in 0..hidden {
                            let pre = |k: usize| xw[k * hidden + j] + hr[k * hidden + j];
                            let i = f(cl(pre(0) + pp(0, j) * c[j]));
                            let fg = if input_forget { 1.0 - i } else { f(cl(pre(2) + pp(2, j) * c[j])) };
                            let cc = g(cl(pre(3)));
                            next_c[j] = fg * c[j] + i * cc;
                        }
                        for j in 0..hidden {
                            let o = f(cl(xw[hidden + j] + hr[hidden + j] + pp(1, j) * next_c[j]));
                            h[j] = o * hact(next_c[j]);
                        }
                        c = next_c;
                    }
                    "GRU" => {
                        let g = g.ok_or("GRU needs 2 activations")?;
                        let z: Vec<f64> = (0..hidden).map(|j| f(cl(xw[j] + hr[j]))).collect();
                        let rr: Vec<f64> = (0..hidden).map(|j| f(cl(xw[hidden + j] + hr[hidden + j]))).collect();
                        let hh: Vec<f64> = if lbr {
                            (0..hidden).map(|j| g(cl(xw[2 * hidden + j] + rr[j] * hr[2 * hidden + j]))).collect()
                        } else {
                            let rh: Vec<f64> = (0..hidden).map(|j| rr[j] * h[j]).collect();
                            let mut m = rb[2 * hidden..3 * hidden].to_vec();
                            matvec_add(&mut m, &rd[2 * hidden * hidden..3 * hidden * hidden], &rh);
                            (0..hidden).map(|j| g(cl(xw[2 * hidden + j] + m[j]))).collect()
                        };
                        for j in 0..hidden {
                            h[j] = (1.0 - z[j]) * hh[j] + z[j] * h[j];
                        }
                    }
                    _ => {
                        for j in 0..hidden {
                            h[j] = f(cl(xw[j] + hr[j]));
                        }
                    }
                }
                let at = if layout == 0 {
                    ((t * dirs + d) * batch + b) * hidden
                } else {
                    ((b * seq + t) * dirs + d) * hidden
                };
                y[at..at + hidden].copy_from_slice(&h);
            }
            let at = if layout == 0 { (d * batch + b) * hidden } else { (b * dirs + d) * hidden };
            yh[at..at + hidden].copy_from_slice(&h);
            yc[at..at + hidden].copy_from_slice(&c);
        }
    }
    let dt = x.dtype();
    let (ys, hs) = if layout == 0 {
        (vec![seq, dirs, batch, hidden], vec![dirs, batch, hidden])
    } else {
        (vec![batch, seq, dirs, hidden], vec![batch, dirs, hidden])
    };
    let mut outs = vec![tensor(ys, TensorData::F64(y))?.cast(dt), tensor(hs.clone(), TensorData::F64(yh))?.cast(dt)];
    if kind == "LSTM" {
        outs.push(tensor(hs, TensorData::F64(yc))?.cast(dt));
    }
    Ok(outs)
}
