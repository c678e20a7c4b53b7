//! `--config FILE.toml`: a subcommand's flags from a file. Each key is a long flag of that subcommand (`_` or
//! `-`); its value is the flag's value (`method = "mse"`), a list repeats the flag (`exclude = ["Softmax"]`), and
//! `true` turns a switch on. The file's flags are placed before the ones typed, so the command line overrides the
//! file (the subcommands that take `--config` let a later flag replace an earlier one; list flags add up).
use std::ffi::{OsStr, OsString};
use std::path::Path;

/// `args` (argv, program name first) with the `--config` file of the subcommand that takes one expanded into
/// flags right after the subcommand's name; unchanged when no `--config` is given. Errors are one line.
pub fn expand(args: Vec<OsString>, cmd: &clap::Command) -> Result<Vec<OsString>, String> {
    let with_config = |name: &OsStr| {
        cmd.get_subcommands()
            .find(|s| OsStr::new(s.get_name()) == name && s.get_arguments().any(|a| a.get_id() == "config"))
    };
    // The subcommand is the first word that is neither an option nor the value of one (`--log-level LEVEL`).
    let mut at = 1;
    while at < args.len() {
        match args[at].to_str() {
            Some("--log-level") => at += 2,
            Some(a) if a.starts_with('-') => at += 1,
            _ => break,
        }
    }
    let Some(sub) = args.get(at).and_then(|a| with_config(a)) else { return Ok(args) };
    let mut file = None;
    let mut rest = args[at + 1..].iter();
    while let Some(a) = rest.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        } else if s == "--config" {
            file = rest.next().cloned();
        } else if let Some(v) = s.strip_prefix("--config=") {
            file = Some(v.into());
        }
    }
    let Some(file) = file else { return Ok(args) };
    let flags = flags_from(Path::new(&file), sub)?;
    let mut out = args[..=at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

fn flags_from(path: &Path, sub: &clap::Command) -> Result<Vec<OsString>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!("--config {shown}: not valid TOML: {}", e.message().lines().next().unwrap_or_default())
    })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        if sub.get_positionals().any(|a| a.get_id() == key.as_str()) {
            return Err(format!("--config {shown}: `{key}` is an argument, not a flag: give it on the command line"));
        }
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| format!("--config {shown}: `{key}` is not a flag of `edgepack {}`", sub.get_name()))?;
        let flag = OsString::from(format!("--{long}"));
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &toml::Value| -> Result<OsString, String> {
            Ok(match v {
                toml::Value::String(s) => s.into(),
                toml::Value::Integer(i) => i.to_string().into(),
                toml::Value::Float(f) => f.to_string().into(),
                toml::Value::Boolean(b) => b.to_string().into(),
                _ => return Err(format!("--config {shown}: `{key}` takes a string, number or a list of them")),
            })
        };
        match (&value, takes_value) {
            (toml::Value::Boolean(on), false) => {
                if *on {
                    out.push(flag);
                }
            }
            (_, false) => return Err(format!("--config {shown}: `{key}` is a switch: give it true or false")),
            (toml::Value::Array(items), true) => {
                for v in items {
                    out.push(flag.clone());
                    out.push(scalar(v)?);
                }
            }
            (v, true) => {
                out.push(flag);
                out.push(scalar(v)?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("edgepack")
            .arg(Arg::new("quiet").short('q').action(ArgAction::SetTrue))
            .arg(Arg::new("log_level").long("log-level"))
            .subcommand(
                Command::new("quantize")
                    .args_override_self(true)
                    .arg(Arg::new("model"))
                    .arg(Arg::new("method").long("method"))
                    .arg(Arg::new("calib_limit").long("calib-limit"))
                    .arg(Arg::new("exclude").long("exclude").action(ArgAction::Append))
                    .arg(Arg::new("shuffle").long("shuffle").action(ArgAction::SetTrue))
                    .arg(Arg::new("config").long("config")),
            )
    }

    fn expand_with(toml: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("q.toml");
        std::fs::write(&f, toml).unwrap();
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.push("--config".into());
        argv.push(f.into_os_string());
        expand(argv, &cmd()).map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn file_flags_come_first_and_the_command_line_wins() {
        let args = expand_with(
            "method = \"mse\"\ncalib_limit = 50\nexclude = [\"Softmax\", \"Add\"]\nshuffle = true\n",
            &["edgepack", "-q", "--log-level", "warn", "quantize", "m.onnx", "--method", "entropy"],
        )
        .unwrap();
        let m = cmd().try_get_matches_from(&args).unwrap();
        let q = m.subcommand_matches("quantize").unwrap();
        assert_eq!(q.get_one::<String>("method").unwrap(), "entropy", "{args:?}");
        assert_eq!(q.get_one::<String>("calib_limit").unwrap(), "50");
        assert!(q.get_flag("shuffle"));
        let ex: Vec<&String> = q.get_many("exclude").unwrap().collect();
        assert_eq!(ex, ["Softmax", "Add"]);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let unknown = expand_with("methd = \"mse\"", &["edgepack", "quantize", "m.onnx"]).unwrap_err();
        let positional = expand_with("model = \"m.onnx\"", &["edgepack", "quantize"]).unwrap_err();
        assert!(positional.contains("`model` is an argument, not a flag"), "{positional}");
        assert!(unknown.contains("`methd` is not a flag of `edgepack quantize`"), "{unknown}");
        let switch = expand_with("shuffle = \"yes\"", &["edgepack", "quantize"]).unwrap_err();
        assert!(switch.contains("is a switch"), "{switch}");
        let bad = expand_with("method = ", &["edgepack", "quantize"]).unwrap_err();
        assert!(bad.contains("not valid TOML") && !bad.contains('\n'), "{bad}");
        let missing = expand(
            ["edgepack", "quantize", "--config", "/nonexistent/q.toml"].iter().map(OsString::from).collect(),
            &cmd(),
        )
        .unwrap_err();
        assert!(missing.starts_with("--config /nonexistent/q.toml:"), "{missing}");
    }

    #[test]
    fn without_config_nothing_changes() {
        for argv in [&["edgepack", "quantize", "m.onnx"][..], &["edgepack", "run", "quantize", "--config", "x"]] {
            let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
            assert_eq!(expand(argv.clone(), &cmd()).unwrap(), argv);
        }
    }
}
