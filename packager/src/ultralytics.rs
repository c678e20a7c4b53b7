//! Ultralytics exports describe themselves in the ONNX metadata (`task`, `names`, `imgsz`, `kpt_shape`): `pack`
//! reads them to give a YOLO model its post-processing, labels and input size without flags.
use edgepack_runtime::onnx::Model;
use edgepack_runtime::process::YoloTask;

/// What an Ultralytics export says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloExport {
    /// The class names in index order (`names`).
    pub names: Vec<String>,
    pub task: YoloTask,
    /// The export size (height, width), from `imgsz`.
    pub imgsz: Option<(u32, u32)>,
}

/// The Ultralytics description of a model, when its metadata has one (`task` detect/segment/pose and `names`).
pub fn yolo_export(model: &Model) -> Option<YoloExport> {
    let meta = model.metadata();
    let get = |k: &str| meta.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let names = parse_names(get("names")?)?;
    let task = match get("task")? {
        "detect" => YoloTask::Detect,
        "segment" => YoloTask::Segment { protos_output: None, mask_coefficients: 32 },
        "pose" => {
            let k = ints(get("kpt_shape").unwrap_or("[17, 3]"));
            match k.as_slice() {
                [n, d] if *n > 0 && (2..=3).contains(d) => {
                    YoloTask::Pose { keypoints: *n as usize, keypoint_dims: *d as usize }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    let imgsz = match ints(get("imgsz").unwrap_or("")).as_slice() {
        [s] if *s > 0 => Some((*s as u32, *s as u32)),
        [h, w] if *h > 0 && *w > 0 => Some((*h as u32, *w as u32)),
        _ => None,
    };
    Some(YoloExport { names, task, imgsz })
}

fn ints(s: &str) -> Vec<i64> {
    s.split(|c: char| !c.is_ascii_digit()).filter(|t| !t.is_empty()).filter_map(|t| t.parse().ok()).collect()
}

/// Parses a Python dict literal of `index: 'name'` pairs (what Ultralytics writes: `{0: 'person', 1: "it's"}`)
/// into names in index order; `None` unless the indices are exactly 0..n.
pub fn parse_names(s: &str) -> Option<Vec<String>> {
    let b = s.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut pairs: Vec<(usize, String)> = Vec::new();
    let mut it = b.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            it.next();
        }
        if it.peek().is_none() {
            break;
        }
        let mut num = String::new();
        while let Some(c) = it.peek().filter(|c| c.is_ascii_digit()) {
            num.push(*c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some(':') {
            return None;
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let quote = it.next().filter(|q| *q == '\'' || *q == '"')?;
        let mut name = String::new();
        loop {
            match it.next()? {
                '\\' => name.push(it.next()?),
                c if c == quote => break,
                c => name.push(c),
            }
        }
        pairs.push((num.parse().ok()?, name));
    }
    pairs.sort_by_key(|p| p.0);
    pairs.iter().enumerate().all(|(i, p)| p.0 == i).then(|| pairs.into_iter().map(|p| p.1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultralytics_names_in_index_order() {
        let n = parse_names("{0: 'Caption', 1: 'Footnote', 10: 'Title', 2: 'Formula', 3: 'List-item', 4: \
                             'Page-footer', 5: 'Page-header', 6: 'Picture', 7: 'Section-header', 8: 'Table', 9: 'Text'}")
            .unwrap();
        assert_eq!(n.len(), 11);
        assert_eq!((n[0].as_str(), n[2].as_str(), n[10].as_str()), ("Caption", "Formula", "Title"));
        assert_eq!(parse_names(r#"{0: "it's", 1: 'a\'b'}"#).unwrap(), ["it's", "a'b"]);
        assert_eq!(parse_names("{}").unwrap(), Vec::<String>::new());
        assert!(parse_names("{0: 'a', 2: 'b'}").is_none());
        assert!(parse_names("[0, 1]").is_none());
        assert!(parse_names("{0: 'unterminated}").is_none());
        assert_eq!(ints("[17, 3]"), [17, 3]);
    }
}
