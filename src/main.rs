fn main() -> std::process::ExitCode {
    slam_ags::cli::main()
}
