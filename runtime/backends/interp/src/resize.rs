//! Resize (opsets 10–19) and Upsample: nearest, linear and cubic interpolation, every coordinate transform, sizes
//! or scales (also computed at run time), axes and the aspect-ratio policies; separable, one axis at a time.
use super::math::f64s;
use super::*;
use edgepack_kernels::reference::{resize_coord, resize_nearest};

/// For one axis: per output coordinate, the (input index, weight) taps, or `None` outside the crop
/// (tf_crop_and_resize's extrapolation).
type Taps = Vec<Option<Vec<(usize, f64)>>>;

struct Mode<'a> {
    interp: &'a str,
    coord: &'a str,
    nearest: &'a str,
    cubic_a: f64,
    exclude_outside: bool,
}

fn taps(m: &Mode, len_in: usize, len_out: usize, scale: f64, roi: (f64, f64)) -> Taps {
    let i_in = len_in as f64;
    (0..len_out)
        .map(|xo| {
            let x = resize_coord(m.coord, xo, len_in, len_out, scale, roi)?;
            let clampi = |v: i64| v.clamp(0, len_in as i64 - 1) as usize;
            Some(match m.interp {
                "nearest" => {
                    let k = resize_nearest(m.nearest, x);
                    vec![(clampi(k as i64), 1.0)]
                }
                "linear" => {
                    let x = if m.coord == "tf_crop_and_resize" { x } else { x.clamp(0.0, i_in - 1.0) };
                    let f = x.floor();
                    let w = x - f;
                    vec![(clampi(f as i64), 1.0 - w), (clampi((f as i64).saturating_add(1)), w)]
                }
                _ => {
                    // Cubic convolution (Keys) with coefficient A.
                    let a = m.cubic_a;
                    let f = x.floor();
                    let t = x - f;
                    let k = |d: f64| {
                        let d = d.abs();
                        if d <= 1.0 {
                            ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
                        } else if d < 2.0 {
                            ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
                        } else {
                            0.0
                        }
                    };
                    let mut v: Vec<(usize, f64, bool)> = (-1..=2)
                        .map(|o| {
                            let idx = (f as i64).saturating_add(o);
                            (clampi(idx), k(t - o as f64), (0..len_in as i64).contains(&idx))
                        })
                        .collect();
                    if m.exclude_outside {
                        v.retain(|e| e.2);
                        let s: f64 = v.iter().map(|e| e.1).sum();
                        v.iter_mut().for_each(|e| e.1 /= s);
                    }
                    v.into_iter().map(|(i, w, _)| (i, w)).collect()
                }
            })
        })
        .collect()
}

/// Interpolates along one axis of `v` (shape `shape`); returns the new values, with NaN where extrapolated.
fn along(v: &[f64], shape: &[usize], ax: usize, t: &Taps, extrapolate: f64) -> Vec<f64> {
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product();
    let (len, out_len) = (shape[ax], t.len());
    let mut y = vec![0.0; outer * out_len * inner];
    for o in 0..outer {
        for (k, tk) in t.iter().enumerate() {
            for i in 0..inner {
                y[(o * out_len + k) * inner + i] = match tk {
                    Some(taps) => taps.iter().map(|&(j, w)| w * v[(o * len + j) * inner + i]).sum(),
                    None => extrapolate,
                };
            }
        }
    }
    y
}

pub(crate) fn op_resize(a: &Args) -> Res<Vec<Tensor>> {
    let x = a.x()?;
    let n = a.n;
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let upsample = n.op() == "Upsample";
    let opt = |i: usize| a.ins.get(i).copied().flatten().filter(|t| !t.is_empty());
    let (roi_t, scales_t, sizes_t) =
        if upsample || a.opset < 11 { (None, opt(1), None) } else { (opt(1), opt(2), opt(3)) };
    let axes: Vec<usize> = match n.attr_ints("axes") {
        Some(v) => v.iter().map(|&d| axis(d, rank)).collect::<Res<_>>()?,
        None => (0..rank).collect(),
    };
    let mut scales = vec![1.0f64; rank];
    let mut out = shape.clone();
    if let Some(s) = sizes_t {
        let sz = i64s(s)?;
        if sz.len() != axes.len() {
            return Err(format!("{} sizes for {} axes", sz.len(), axes.len()));
        }
        let policy = n.attr_s("keep_aspect_ratio_policy").unwrap_or("stretch");
        let ratios: Vec<f64> = axes.iter().zip(&sz).map(|(&d, &s)| s as f64 / shape[d] as f64).collect();
        let pick = match policy {
            "not_larger" => Some(ratios.iter().copied().fold(f64::INFINITY, f64::min)),
            "not_smaller" => Some(ratios.iter().copied().fold(0.0, f64::max)),
            _ => None,
        };
        for (k, &d) in axes.iter().enumerate() {
            match pick {
                Some(r) => {
                    scales[d] = r;
                    out[d] = (shape[d] as f64 * r).round() as usize;
                }
                None => {
                    out[d] = sz[k].max(0) as usize;
                    scales[d] = out[d] as f64 / shape[d] as f64;
                }
            }
        }
    } else {
        let sc: Vec<f64> = match scales_t {
            Some(s) => f64s(s),
            None => n
                .attr("scales")
                .map(|v| v.floats.iter().map(|&f| f as f64).collect())
                .ok_or("Resize needs scales or sizes")?,
        };
        if sc.len() != axes.len() {
            return Err(format!("{} scales for {} axes", sc.len(), axes.len()));
        }
        for (k, &d) in axes.iter().enumerate() {
            scales[d] = sc[k];
            out[d] = (shape[d] as f64 * sc[k]).floor() as usize;
        }
    }
    let roi: Vec<f64> = roi_t.map(f64s).unwrap_or_default();
    let mode = n.attr_s("mode").unwrap_or("nearest");
    let m = Mode {
        interp: match mode {
            "bilinear" | "linear" => "linear",
            "cubic" => "cubic",
            _ => "nearest",
        },
        coord: if upsample || a.opset < 11 {
            "asymmetric"
        } else {
            n.attr_s("coordinate_transformation_mode").unwrap_or("half_pixel")
        },
        nearest: if upsample || a.opset < 11 {
            "floor"
        } else {
            n.attr_s("nearest_mode").unwrap_or("round_prefer_floor")
        },
        cubic_a: n.attr_f("cubic_coeff_a").unwrap_or(-0.75) as f64,
        exclude_outside: n.attr_i("exclude_outside").unwrap_or(0) != 0,
    };
    if n.attr_i("antialias").unwrap_or(0) != 0 && scales.iter().any(|&s| s < 1.0) && m.interp != "nearest" {
        return Err("antialiased downscaling is not supported".into());
    }
    checked_len(&out)?;
    if let Some(d) = (0..rank).find(|&d| shape[d] == 0 && out[d] > 0) {
        return Err(format!("Resize of an empty axis {d} to {}", out[d]));
    }
    let extrapolate = n.attr_f("extrapolation_value").unwrap_or(0.0) as f64;
    let mut v = f64s(x);
    let mut cur = shape.clone();
    for d in 0..rank {
        if out[d] == cur[d] && scales[d] == 1.0 && m.coord != "tf_crop_and_resize" {
            continue;
        }
        let k = axes.iter().position(|&x| x == d);
        let r = match k {
            Some(k) if roi.len() == 2 * axes.len() => (roi[k], roi[k + axes.len()]),
            _ if roi.len() == 2 * rank => (roi[d], roi[d + rank]),
            _ => (0.0, 1.0),
        };
        let mut next = cur.clone();
        next[d] = out[d];
        checked_len(&next)?;
        let t = taps(&m, cur[d], out[d], scales[d], r);
        v = along(&v, &cur, d, &t, extrapolate);
        cur[d] = out[d];
    }
    Ok(vec![tensor(out, TensorData::F64(v))?.cast(x.dtype())])
}
