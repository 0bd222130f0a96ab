//! `cargo xtask`: the project's own commands, in Rust so that they need
//! nothing but cargo (the alias is in `.cargo/config.toml`).
//!
//! - `cargo xtask test [ARGS…]`: `setup`, then `cargo test --workspace ARGS…`.
//!   The README's test command: a fresh Debian machine with the Rust
//!   toolchain runs the whole suite with it.
//! - `cargo xtask setup [--check-only]`: only the install step;
//!   `--check-only` reports what is missing and installs nothing.
//!
//! The suite runs real engines rather than skipping when they are absent
//! (PostgreSQL, nats-server, haproxy, the Go and PHP webhook examples, the
//! paho-mqtt client), so something has to install them. Debian package
//! names throughout: as root this runs `apt-get`; otherwise it prints the
//! exact command and fails, because a test command that asks for a password
//! half-way is worse than one that says what it needs.
//!
//! Plain std: this binary is built before anything is installed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

/// Where the server binaries of Debian's `postgresql` package live.
const PG_GLOB_DIR: &str = "/usr/lib/postgresql";
/// The dashboard's browser test looks for exactly these paths.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The paho-mqtt the conformance tests drive (`tests/tests/conformance.rs`).
const PAHO: &str = "paho-mqtt==2.*";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let cmd = args.next().and_then(|a| a.into_string().ok());
    let rest: Vec<OsString> = args.collect();
    let result = match cmd.as_deref() {
        Some("test") => setup(false).and_then(|()| cargo_test(&rest)),
        Some("setup") => match rest.first().and_then(|a| a.to_str()) {
            None => setup(false),
            Some("--check-only") if rest.len() == 1 => setup(true),
            Some(other) => Err(format!("setup: unknown argument {other:?}\n{USAGE}")),
        },
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage:
  cargo xtask test [ARGS...]        install what the tests need, then cargo test --workspace ARGS...
  cargo xtask setup [--check-only]  only the install step (--check-only: report, install nothing)";

/// One thing the suite needs, the Debian packages that provide it, and
/// whether its absence fails the suite (true) or makes a test skip itself
/// with a printed reason (false: only the Chromium browser test).
struct Need {
    what: &'static str,
    packages: &'static [&'static str],
    required: bool,
    present: fn() -> bool,
}

fn needs() -> [Need; 7] {
    [
        Need {
            what: "PostgreSQL (initdb)",
            packages: &["postgresql"],
            required: true,
            present: postgres_present,
        },
        Need {
            what: "nats-server",
            packages: &["nats-server"],
            required: true,
            present: || on_path("nats-server"),
        },
        Need {
            what: "haproxy",
            packages: &["haproxy"],
            required: true,
            present: || on_path("haproxy"),
        },
        Need {
            what: "go (the Go webhook example)",
            packages: &["golang"],
            required: true,
            present: || on_path("go"),
        },
        Need {
            what: "php (the PHP webhook example)",
            packages: &["php-cli"],
            required: true,
            present: || on_path("php"),
        },
        Need {
            what: "python3 with pip (installs paho-mqtt)",
            packages: &["python3-pip"],
            required: true,
            present: || succeeds(Command::new("python3").args(["-m", "pip", "--version"])),
        },
        Need {
            what: "chromium and chromedriver (the dashboard browser test)",
            packages: &["chromium", "chromium-driver"],
            required: false,
            present: || Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        },
    ]
}

/// The install step: Debian packages, then paho-mqtt into the pydeps
/// directory. Prints what it did and how long it took.
fn setup(check_only: bool) -> Result<(), String> {
    let started = Instant::now();
    let needs = needs();
    let missing: Vec<&Need> = needs.iter().filter(|n| !(n.present)()).collect();
    let required: Vec<&str> = packages(missing.iter().filter(|n| n.required));
    let optional: Vec<&str> = packages(missing.iter().filter(|n| !n.required));
    for n in &missing {
        println!(
            "xtask: missing {} (Debian: {})",
            n.what,
            n.packages.join(" ")
        );
    }
    let paho_ok = paho_present();
    if !paho_ok {
        println!(
            "xtask: missing {PAHO} in {} (pip --target)",
            pydeps().display()
        );
    }

    if check_only {
        return if required.is_empty() && paho_ok {
            println!("xtask: everything the test suite needs is present");
            Ok(())
        } else {
            Err(
                "something the test suite needs is missing (`cargo xtask setup` installs it)"
                    .into(),
            )
        };
    }

    let mut installed: Vec<&str> = Vec::new();
    if !required.is_empty() {
        if !is_root() || !on_path("apt-get") {
            return Err(format!(
                "the test suite needs these Debian packages; install them with:\n\n    {}\n\n\
                 then run `cargo xtask test` again{}",
                apt_command(&required, !is_root()),
                if on_path("apt-get") {
                    " (not root: not installing them myself)"
                } else {
                    " (no apt-get here: use your system's equivalents)"
                }
            ));
        }
        apt_install(&required)?;
        installed.extend(&required);
        let still: Vec<&str> = needs
            .iter()
            .filter(|n| n.required && !(n.present)())
            .map(|n| n.what)
            .collect();
        if !still.is_empty() {
            return Err(format!(
                "still missing after apt-get install: {}",
                still.join(", ")
            ));
        }
    }
    if !optional.is_empty() {
        // Chromium is big and not packaged everywhere (some architectures,
        // some containers): without it the browser test skips, saying so.
        let why = if !is_root() || !on_path("apt-get") {
            Some(format!(
                "not installing as non-root; run: {}",
                apt_command(&optional, true)
            ))
        } else {
            apt_install(&optional).err()
        };
        match why {
            None => installed.extend(&optional),
            Some(why) => println!(
                "xtask: chromium could not be installed ({why}); the dashboard browser test will skip"
            ),
        }
    }
    if !paho_ok {
        pip_install_paho()?;
        installed.push(PAHO);
    }

    if installed.is_empty() {
        println!("xtask: everything the test suite needs is present");
    } else {
        println!(
            "xtask: installed {} in {:.0?}",
            installed.join(" "),
            started.elapsed()
        );
    }
    Ok(())
}

fn packages<'a>(needs: impl Iterator<Item = &'a &'a Need>) -> Vec<&'static str> {
    needs.flat_map(|n| n.packages.iter().copied()).collect()
}

/// The command a person would type (with `sudo` when not root).
fn apt_command(pkgs: &[&str], sudo: bool) -> String {
    let sudo = if sudo { "sudo " } else { "" };
    format!(
        "{sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {}",
        pkgs.join(" ")
    )
}

/// `apt-get update` then `apt-get install`, non-interactive. Without
/// recommends: they add hundreds of megabytes (documentation, fonts, X
/// libraries) that no test uses.
fn apt_install(pkgs: &[&str]) -> Result<(), String> {
    println!("xtask: {}", apt_command(pkgs, false));
    for args in [
        vec!["update", "-qq"],
        [
            &["install", "-y", "-qq", "--no-install-recommends"][..],
            pkgs,
        ]
        .concat(),
    ] {
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("running apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get {} failed: {status}", args.join(" ")));
        }
    }
    Ok(())
}

/// The workspace root (this crate's parent directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the conformance tests import paho-mqtt from; the same default and
/// override (`VENDGATE_PYDEPS`) as `tests/tests/conformance.rs`.
fn pydeps() -> PathBuf {
    std::env::var_os("VENDGATE_PYDEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/pydeps"))
}

fn paho_present() -> bool {
    succeeds(Command::new("python3").env("PYTHONPATH", pydeps()).args([
        "-c",
        "import paho.mqtt, sys; sys.exit(not paho.mqtt.__version__.startswith('2.'))",
    ]))
}

/// pip with `--target`: a directory of our own, so neither root nor a
/// virtualenv is needed and the system Python is left alone.
fn pip_install_paho() -> Result<(), String> {
    println!(
        "xtask: python3 -m pip install --target {} '{PAHO}'",
        pydeps().display()
    );
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(pydeps())
        .arg(PAHO)
        // Its own directory: pip's warning about running as root is moot.
        // (An environment variable, which older pips ignore, not a flag.)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running pip: {e}"))?;
    if status.success() && paho_present() {
        Ok(())
    } else {
        Err(format!("pip could not install {PAHO} ({status})"))
    }
}

/// `cargo test --workspace ARGS…` from the workspace root, with the cargo
/// that runs us; its exit status is ours.
fn cargo_test(args: &[OsString]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(["test", "--workspace"])
        .args(args)
        .status()
        .map_err(|e| format!("running cargo test: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo test --workspace failed ({status})"))
    }
}

fn postgres_present() -> bool {
    std::fs::read_dir(PG_GLOB_DIR).is_ok_and(|dirs| {
        dirs.flatten()
            .any(|d| is_executable(&d.path().join("bin/initdb")))
    })
}

/// On `PATH`, or in the sbin directories a non-root `PATH` often lacks
/// (Debian puts nats-server and haproxy in /usr/sbin).
fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .any(|d| is_executable(&d.join(name)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Root is uid 0; read from /proc so no libc binding is needed.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
