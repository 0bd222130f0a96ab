//! The `vendgate` binary: a thin shell over [`vendgate::cli`].

fn main() -> std::process::ExitCode {
    vendgate::cli::main()
}
