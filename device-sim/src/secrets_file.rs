//! The `machine_no,secret` files that `vendgate machine add --count N
//! --first M --secrets-out FILE` writes, as read by `fleet` and `load`.
//!
//! One machine per line; blank lines and lines starting with `#` are
//! skipped; surrounding whitespace (and a Windows `\r`) is ignored.
//! Everything after the first comma is the secret.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use vendgate_proto::machine::MachineNo;

/// Bad lines listed in an error message; the rest are only counted.
const SHOWN_BAD_LINES: usize = 10;

/// Why a secrets file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {}", BadLines(.lines))]
    Malformed { path: PathBuf, lines: Vec<BadLine> },
}

/// One line that is not `machine_no,secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based, as editors count.
    pub line: usize,
    pub reason: String,
}

/// Formats bad lines as `line 3: …; line 9: …; and 4 more`.
struct BadLines<'a>(&'a [BadLine]);

impl fmt::Display for BadLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bad) in self.0.iter().take(SHOWN_BAD_LINES).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "line {}: {}", bad.line, bad.reason)?;
        }
        if self.0.len() > SHOWN_BAD_LINES {
            write!(f, "; and {} more", self.0.len() - SHOWN_BAD_LINES)?;
        }
        Ok(())
    }
}

/// Reads and parses a secrets file.
pub fn read(path: &Path) -> Result<Vec<(MachineNo, String)>, SecretsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretsFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|lines| SecretsFileError::Malformed {
        path: path.to_owned(),
        lines,
    })
}

/// Parses the text of a secrets file, in file order. Fails with every bad
/// line (a fleet quietly smaller than asked for would mislead a benchmark);
/// a machine listed twice is a bad line too, as two simulators with one
/// client id would take over each other's connection forever.
pub fn parse(text: &str) -> Result<Vec<(MachineNo, String)>, Vec<BadLine>> {
    let mut machines = Vec::new();
    let mut bad = Vec::new();
    let mut seen: HashMap<MachineNo, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        match parse_line(content) {
            Ok((machine_no, secret)) => {
                if let Some(first) = seen.insert(machine_no, line) {
                    bad.push(BadLine {
                        line,
                        reason: format!("machine {machine_no} already listed on line {first}"),
                    });
                } else {
                    machines.push((machine_no, secret.to_owned()));
                }
            }
            Err(reason) => bad.push(BadLine { line, reason }),
        }
    }
    if bad.is_empty() {
        Ok(machines)
    } else {
        Err(bad)
    }
}

fn parse_line(content: &str) -> Result<(MachineNo, &str), String> {
    let Some((machine, secret)) = content.split_once(',') else {
        return Err("expected machine_no,secret".to_owned());
    };
    let machine = machine.trim();
    // The content is not echoed: it may hold a secret.
    let machine_no = MachineNo::parse(machine)
        .map_err(|_| format!("machine_no is not 8 ASCII digits ({} chars)", machine.len()))?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(format!("empty secret for machine {machine_no}"));
    }
    Ok((machine_no, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MachineNo {
        MachineNo::parse(s).unwrap()
    }

    #[test]
    fn parses_the_provisioning_format() {
        let text = "10000000,s3cr3t-a\n10000001,s3cr3t-b\n";
        assert_eq!(
            parse(text).unwrap(),
            vec![
                (m("10000000"), "s3cr3t-a".to_owned()),
                (m("10000001"), "s3cr3t-b".to_owned()),
            ]
        );
    }

    #[test]
    fn skips_blank_lines_comments_and_whitespace() {
        let text = "# fleet A\n\n  \n 00000001 , abc \r\n\t# note\n00000002,x,y\n";
        assert_eq!(
            parse(text).unwrap(),
            vec![
                (m("00000001"), "abc".to_owned()),
                // Everything after the first comma is the secret.
                (m("00000002"), "x,y".to_owned()),
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn reports_every_bad_line_with_its_number() {
        let text = "10000000,ok\nnot a line\n1234567,short\n\n10000001,\n10000000,again\n";
        let bad = parse(text).unwrap_err();
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 3, 5, 6]);
        assert!(bad[0].reason.contains("machine_no,secret"));
        assert!(bad[1].reason.contains("8 ASCII digits"));
        assert!(bad[2].reason.contains("empty secret"));
        assert!(bad[3].reason.contains("line 1"));
    }

    #[test]
    fn errors_never_echo_secrets() {
        let bad = parse("abcdefgh,topsecret\n").unwrap_err();
        let err = SecretsFileError::Malformed {
            path: "f".into(),
            lines: bad,
        };
        let shown = err.to_string();
        assert!(shown.starts_with("f: line 1: "), "{shown}");
        assert!(!shown.contains("topsecret"), "{shown}");
    }

    #[test]
    fn long_error_lists_are_cut() {
        let text = "x\n".repeat(25);
        let err = SecretsFileError::Malformed {
            path: "f".into(),
            lines: parse(&text).unwrap_err(),
        };
        let shown = err.to_string();
        assert!(shown.contains("line 10:"), "{shown}");
        assert!(!shown.contains("line 11:"), "{shown}");
        assert!(shown.ends_with("and 15 more"), "{shown}");
    }

    #[test]
    fn reads_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.csv");
        std::fs::write(&path, "10000000,a\n").unwrap();
        assert_eq!(read(&path).unwrap().len(), 1);
        let missing = read(&dir.path().join("none")).unwrap_err();
        assert!(matches!(missing, SecretsFileError::Io { .. }));
    }
}
