fn main() -> std::process::ExitCode {
    snapblk::cli::main()
}
