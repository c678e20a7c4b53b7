//! What a bundle says about its model is checked against the model before it is written: the image
//! pre-processing against the input it feeds, the post-processing against the outputs it reads, the labels
//! against the class count. A bundle that cannot work fails at pack time, with the fix, instead of at run time
//! with wrong answers (1000 ImageNet labels on a 10-class model, a detector read as a classifier).
use edgepack_runtime::bundle::{Task, TensorSpec};
use edgepack_runtime::onnx::Dim;
use edgepack_runtime::process::{ColorOrder, Layout, Postprocess, Preprocess, Resize, StreamSpec};

fn fixed(d: &Dim) -> Option<usize> {
    if let Dim::Fixed(n) = d { Some(*n) } else { None }
}

fn shape(t: &TensorSpec) -> String {
    format!("[{}]", t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// The named presets whose channel count is `c` (for the suggestion in an error).
fn presets_with(c: usize) -> String {
    let names: Vec<&str> = edgepack_runtime::process::PRESETS
        .iter()
        .copied()
        .filter(|p| edgepack_runtime::process::ImagePreprocess::preset(p, 8, 8).is_ok_and(|x| x.channels() == c))
        .collect();
    if names.is_empty() { "--preprocess-json".into() } else { names.join(", ") }
}

/// The pre-processing's image against the input it feeds: rank 4, the channel count where its layout puts the
/// channels, the output size, the element type.
fn check_preprocess(pre: &Preprocess, inputs: &[TensorSpec]) -> Result<(), String> {
    let Preprocess::Image(p) = pre;
    let input = match &p.input {
        Some(n) => inputs.iter().find(|i| &i.name == n).ok_or_else(|| {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            format!("the pre-processing feeds input `{n}`, but the model's inputs are {}", names.join(", "))
        })?,
        None => inputs.first().ok_or("the model has no input to pre-process")?,
    };
    if input.shape.len() != 4 {
        return Err(format!(
            "input `{}` {} is not an image batch [N, C, H, W] or [N, H, W, C]; pack without --preset",
            input.name,
            shape(input)
        ));
    }
    let (c, h, w) = match p.layout {
        Layout::Nchw => (&input.shape[1], &input.shape[2], &input.shape[3]),
        Layout::Nhwc => (&input.shape[3], &input.shape[1], &input.shape[2]),
    };
    let layout = if p.layout == Layout::Nchw { "NCHW" } else { "NHWC" };
    if let Some(c) = fixed(c)
        && c != p.channels()
    {
        let color = match p.color {
            ColorOrder::Gray => "grayscale",
            ColorOrder::Rgb => "RGB",
            ColorOrder::Bgr => "BGR",
        };
        return Err(format!(
            "the pre-processing makes {} {color} channel(s) ({layout}) but input `{}` {} takes {c}; presets with \
             {c} channel(s): {}",
            p.channels(),
            input.name,
            shape(input),
            presets_with(c)
        ));
    }
    let size = match p.resize {
        Resize::None => None,
        Resize::Stretch { width, height } => Some((width as usize, height as usize)),
        Resize::ShorterSideCrop { crop_width, crop_height, .. } => Some((crop_width as usize, crop_height as usize)),
        Resize::Letterbox { width, height, .. } => Some((width as usize, height as usize)),
    };
    if let Some((pw, ph)) = size {
        for (what, made, dim) in [("height", ph, h), ("width", pw, w)] {
            if fixed(dim).is_some_and(|d| d != made) {
                return Err(format!(
                    "the pre-processing makes images of {what} {made} but input `{}` {} ({layout}) takes {dim}",
                    input.name,
                    shape(input)
                ));
            }
        }
    }
    if let Some(dt) = input.dtype
        && dt != p.dtype
    {
        return Err(format!(
            "the pre-processing makes {} tensors but input `{}` takes {dt}; set \"dtype\" in --preprocess-json",
            p.dtype, input.name
        ));
    }
    Ok(())
}

/// The (scores, boxes) outputs of an SSD-style detector: the first outputs whose names contain `score` and
/// `box`, what `pack --task detection` reads by default.
pub fn ssd_outputs<'a>(outputs: impl IntoIterator<Item = &'a str> + Clone) -> Option<(&'a str, &'a str)> {
    let find = |w: &str| outputs.clone().into_iter().find(|o| o.contains(w));
    find("score").zip(find("box"))
}

/// What to pack this model as instead, from its outputs.
fn suggest_task(outputs: &[TensorSpec]) -> &'static str {
    if ssd_outputs(outputs.iter().map(|o| o.name.as_str())).is_some() {
        "--task detection"
    } else {
        "--task custom (raw tensors)"
    }
}

/// The class count of a classification output: its one dim beyond the batch that is not 1 ([N, C], [C],
/// [N, C, 1, 1]). `Err` when the output is not a score vector; `Ok(None)` when the count is symbolic.
fn class_count(o: &TensorSpec, outputs: &[TensorSpec]) -> Result<Option<usize>, String> {
    let dims: Vec<&Dim> = o.shape.iter().skip(usize::from(o.shape.len() > 1)).collect();
    let not_one: Vec<&&Dim> = dims.iter().filter(|d| fixed(d) != Some(1)).collect();
    match not_one.as_slice() {
        [] if !dims.is_empty() => Ok(Some(1)),
        [d] => Ok(fixed(d)),
        _ if o.shape.is_empty() => Ok(None),
        _ => Err(format!(
            "output `{}` {} is not a vector of class scores ([batch, classes]), so it cannot be a classifier's; \
             pack it with {}",
            o.name,
            shape(o),
            suggest_task(outputs)
        )),
    }
}

fn output<'a>(outputs: &'a [TensorSpec], name: &str, role: &str) -> Result<&'a TensorSpec, String> {
    outputs.iter().find(|o| o.name == name).ok_or_else(|| {
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        format!("the {role} output `{name}` is not one of the model's outputs ({})", names.join(", "))
    })
}

fn check_labels(labels: usize, classes: usize, offset: usize, o: &TensorSpec) -> Result<(), String> {
    let scored = classes.saturating_sub(offset);
    if labels != scored && labels != classes {
        return Err(format!(
            "{labels} labels for output `{}` {} with {classes} classes{}: the labels file belongs to another model",
            o.name,
            shape(o),
            if offset > 0 { format!(" ({scored} after the label offset {offset})") } else { String::new() }
        ));
    }
    Ok(())
}

/// The post-processing (and the labels it names classes with) against the outputs.
fn check_postprocess(post: &Postprocess, outputs: &[TensorSpec], labels: Option<usize>) -> Result<(), String> {
    match post {
        Postprocess::Classification { output: name, label_offset, .. } => {
            let o = match name {
                Some(n) => output(outputs, n, "classification")?,
                None => outputs.first().ok_or("the model has no output")?,
            };
            if let (Some(classes), Some(l)) = (class_count(o, outputs)?, labels) {
                check_labels(l, classes, *label_offset, o)?;
            }
        }
        Postprocess::SsdDetection { scores_output, boxes_output, classes, .. } => {
            let scores = output(outputs, scores_output, "scores")?;
            let boxes = output(outputs, boxes_output, "boxes")?;
            if boxes.shape.last().and_then(fixed).is_some_and(|d| d != 4)
                || (!boxes.shape.is_empty() && boxes.shape.len() != 3)
            {
                return Err(format!(
                    "boxes output `{}` {} is not [batch, anchors, 4] (x1, y1, x2, y2)",
                    boxes.name,
                    shape(boxes)
                ));
            }
            if !scores.shape.is_empty() && scores.shape.len() != 3 {
                return Err(format!(
                    "scores output `{}` {} is not [batch, anchors, classes]",
                    scores.name,
                    shape(scores)
                ));
            }
            if let Some(n) = scores.shape.last().and_then(fixed) {
                if let Some(c) = classes.iter().find(|&&c| c >= n) {
                    return Err(format!("class {c} is reported but scores output `{}` has {n} classes", scores.name));
                }
                if let Some(l) = labels {
                    check_labels(l, n, 0, scores)?;
                }
            }
        }
        Postprocess::Yolo { output: name, classes, task, .. } => {
            let spec = post.yolo_spec().ok_or("a YOLO head without its parameters")?;
            let o = match name {
                Some(n) => output(outputs, n, "YOLO head")?,
                None => outputs.first().ok_or("the model has no output")?,
            };
            let a = spec.attributes();
            let dims: Vec<Option<usize>> = o.shape.iter().map(fixed).collect();
            let fits = o.shape.is_empty()
                || (dims.len() == 3 && (dims[1].is_none_or(|d| d == a) || dims[2].is_none_or(|d| d == a)));
            if !fits {
                return Err(format!(
                    "output `{}` {} is not a YOLO head of {classes} classes ({a} values per anchor: [batch, {a}, \
                     anchors] or [batch, anchors, {a}]); set \"classes\" (and \"objectness\" for YOLOv5) in \
                     --postprocess-json",
                    o.name,
                    shape(o)
                ));
            }
            if let edgepack_runtime::process::YoloTask::Segment { protos_output, mask_coefficients } = task {
                let p = match protos_output {
                    Some(n) => output(outputs, n, "prototypes")?,
                    None => outputs
                        .iter()
                        .find(|x| x.name != o.name)
                        .ok_or("a YOLO segment head needs a second output, the mask prototypes [batch, 32, mh, mw]")?,
                };
                if !p.shape.is_empty()
                    && (p.shape.len() != 4 || fixed(&p.shape[1]).is_some_and(|m| m != *mask_coefficients))
                {
                    return Err(format!(
                        "prototypes output `{}` {} is not [batch, {mask_coefficients}, mh, mw]",
                        p.name,
                        shape(p)
                    ));
                }
            }
            if let Some(l) = labels
                && l != *classes
            {
                return Err(format!(
                    "{l} labels for a YOLO head of {classes} classes (output `{}`): the labels file belongs to \
                     another model",
                    o.name
                ));
            }
        }
    }
    Ok(())
}

/// Checks the bundle's description against the model's inputs and outputs. The message names the mismatch and
/// the fix.
pub fn check(
    task: Task,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    pre: Option<&Preprocess>,
    post: Option<&Postprocess>,
    labels: Option<usize>,
) -> Result<(), String> {
    if let Some(p) = pre {
        check_preprocess(p, inputs)?;
    }
    if let Some(p) = post {
        let fits = match task {
            Task::Classification => matches!(p, Postprocess::Classification { .. }),
            Task::Detection => p.is_detection(),
            Task::Custom => true,
        };
        if !fits {
            return Err(format!("{} post-processing does not fit the task `{task}`", p.kind()));
        }
    }
    if let Some(p) = post {
        check_postprocess(p, outputs, labels)?;
    }
    Ok(())
}

/// A stream description against the model: every input and output it names exists; state inputs have declared
/// shapes (zeros at the start, a symbolic dim taken as 1) and state outputs the same; the chunk input takes `[1, context + chunk]`.
pub fn check_stream(st: &StreamSpec, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Result<(), String> {
    st.validate().map_err(|e| e.to_string())?;
    let names = |v: &[TensorSpec]| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(", ");
    let input = |n: &str| {
        inputs
            .iter()
            .find(|i| i.name == n)
            .ok_or_else(|| format!("the stream names input `{n}`; the model's inputs are {}", names(inputs)))
    };
    let output = |n: &str| {
        outputs
            .iter()
            .find(|o| o.name == n)
            .ok_or_else(|| format!("the stream names output `{n}`; the model's outputs are {}", names(outputs)))
    };
    let x = input(&st.input)?;
    if x.shape.len() != 2 || x.shape[1..].iter().any(|d| fixed(d).is_some_and(|n| n != st.context + st.chunk)) {
        return Err(format!(
            "stream input `{}` {} does not take [1, {}] (context {} + chunk {})",
            x.name,
            shape(x),
            st.context + st.chunk,
            st.context,
            st.chunk
        ));
    }
    for link in &st.state {
        let (i, o) = (input(&link.input)?, output(&link.output)?);
        if i.shape.is_empty() {
            return Err(format!("state input `{}` has no declared shape (it starts as zeros of that shape)", i.name));
        }
        let same = |a: &Dim, b: &Dim| fixed(a).zip(fixed(b)).is_none_or(|(x, y)| x == y);
        if !o.shape.is_empty()
            && (o.shape.len() != i.shape.len() || !o.shape.iter().zip(&i.shape).all(|(a, b)| same(a, b)))
        {
            return Err(format!("state output `{}` {} does not fit input `{}` {}", o.name, shape(o), i.name, shape(i)));
        }
    }
    for c in st.constants.keys() {
        input(c)?;
    }
    if let Some(o) = &st.output {
        output(o)?;
    }
    let fed: Vec<&str> = std::iter::once(st.input.as_str())
        .chain(st.state.iter().map(|l| l.input.as_str()))
        .chain(st.constants.keys().map(String::as_str))
        .collect();
    if let Some(i) = inputs.iter().find(|i| !fed.contains(&i.name.as_str())) {
        return Err(format!("the stream does not feed input `{}` (give it as state or a constant)", i.name));
    }
    Ok(())
}
