#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    renv::cli::main()
}
