//! The `copyhold` binary: argument parsing only; the work lives in the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "copyhold",
    version,
    about = "Operator for sovereign community GPU clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRDs generated from the Rust types.
    Crdgen {
        /// Directory to write `*.yaml` into; prints to stdout when absent.
        #[arg(long, env = "COPYHOLD_CRD_DIR")]
        out: Option<PathBuf>,
    },
    /// Check manifests of copyhold resources for what the API server's schema
    /// cannot express (the controller reports the same as conditions).
    Validate {
        /// Manifest files (YAML, several documents allowed).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out } => match copyhold::crdgen::run(out.as_deref()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold crdgen: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Validate { files } => {
            let mut failed = false;
            for file in &files {
                match copyhold::validation::validate_file(file) {
                    Ok(reports) => {
                        for r in reports {
                            if r.errors.is_empty() {
                                println!("{}: {} {}: valid", file.display(), r.kind, r.name);
                            } else {
                                failed = true;
                                for e in r.errors {
                                    println!("{}: {} {}: {e}", file.display(), r.kind, r.name);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!("{}: {e}", file.display());
                    }
                }
            }
            if failed {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
    }
}
