//! The `vendgate` binary: a thin shell over [`vendgate::tools::cli`].

fn main() -> std::process::ExitCode {
    cap_malloc_arenas();
    vendgate::tools::cli::main()
}

/// glibc gives each thread that allocates its own arena (up to 8 × cores);
/// with ten thousand long-lived connections spread over the runtime's
/// threads that fragmentation costs ≈ 1.3 KB RSS per idle machine (measured:
/// 5.0 KB per machine by default, 3.7 KB with arenas capped at the core
/// count; mimalloc measured worse, 6.1 KB). See BENCHMARKS.md.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(2);
        // SAFETY: mallopt only sets an allocator tunable; it is called before
        // any other thread exists, and a refusal (return 0) is harmless.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
