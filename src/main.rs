fn main() -> std::process::ExitCode {
    // Keep freed activation memory for the next step instead of returning it to the kernel:
    // otherwise every training step faults in (and zeroes) its activations afresh, about 5%
    // of a CPU step.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    // Output piped into `head` ends quietly, as other command-line tools do, instead of
    // panicking on the closed pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    slam_ags::cli::main()
}
