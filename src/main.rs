fn main() -> std::process::ExitCode {
    renv::cli::main()
}
