//! The `ferry-agent` binary: flags in, one of the library's commands run, its result printed.
//! Exit status: 0 done, 1 usage or other failure, 3 gateway unreachable or TLS refused,
//! 4 refused by the gateway (401/403), 5 local state problem (see `ferry_agent::error`).
//! Errors are one line on stderr: `ferry-agent: <message>`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::enroll::{self, EnrollArgs, Token};
use ferry_agent::error::EXIT_OTHER;
use ferry_agent::state::{DEFAULT_DIR, DIR_ENV};
use ferry_agent::{AgentError, status};
use ferry_proto::trust::Fingerprint;

/// Ferry's agent on a protected machine.
#[derive(Parser, Debug)]
#[command(name = "ferry-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this machine with a gateway: make a key, get a certificate for it with a
    /// one-time token (`ferry agent token create` prints the whole command), save both.
    Enroll(EnrollCli),
    /// Check the enrollment: send a heartbeat, then show the gateway's record of this agent
    /// and its protected items.
    Status(StatusCli),
}

#[derive(Args, Debug)]
struct StateDirArg {
    /// The state directory (created 0700).
    #[arg(long, value_name = "DIR", env = DIR_ENV, default_value = DEFAULT_DIR)]
    state_dir: PathBuf,
}

#[derive(Args, Debug)]
struct EnrollCli {
    /// The gateway's URL, `https://host:port`.
    #[arg(long, value_name = "URL")]
    gateway: String,
    /// The one-time enrollment token (never printed). Prefer `FERRY_AGENT_TOKEN` (what
    /// `ferry agent token create` prints): a command line is readable by every local user.
    /// Tokens are base64url and may start with `-`; such a value is taken as the token.
    #[arg(
        long,
        value_name = "TOKEN",
        allow_hyphen_values = true,
        value_parser = Token::from_arg,
        env = "FERRY_AGENT_TOKEN",
        hide_env_values = true
    )]
    token: Token,
    /// The appliance CA's SHA-256 fingerprint, as `ferryd up` prints it; the only CA trusted.
    #[arg(long, value_name = "SHA256", value_parser = Fingerprint::parse)]
    ca_fingerprint: Fingerprint,
    #[command(flatten)]
    dir: StateDirArg,
    /// Replace an existing enrollment in the state directory.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct StatusCli {
    #[command(flatten)]
    dir: StateDirArg,
    /// Output format: `table` for people, `json` for scripts (the gateway's JSON as it is).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned text.
    Table,
    /// `{"agent": …, "items": […]}`, one line.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_OTHER } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(text) => {
            let mut o = std::io::stdout().lock();
            // A closed pipe (`ferry-agent status | head`) is not a failure.
            let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs a command; returns what to print on stdout.
async fn run(cmd: Command) -> Result<String, AgentError> {
    match cmd {
        Command::Enroll(a) => {
            let done = enroll::enroll(EnrollArgs {
                gateway: a.gateway,
                token: a.token,
                ca_fingerprint: a.ca_fingerprint,
                state_dir: a.dir.state_dir,
                force: a.force,
            })
            .await?;
            let items = if done.items.is_empty() {
                "none yet".to_string()
            } else {
                done.items.join(", ")
            };
            Ok(format!(
                "enrolled as agent `{}` with the gateway {}\n\
                 certificate: {}, expires {}\n\
                 protected items: {items}\n\
                 saved in {}\n",
                done.agent,
                done.gateway,
                done.certificate_sha256,
                done.certificate_expires,
                done.state_dir.display()
            ))
        }
        Command::Status(a) => {
            let r = status::status(&a.dir.state_dir).await?;
            Ok(match a.output {
                Output::Json => format!("{}\n", status::render_json(&r)),
                Output::Table => status::render_table(&r),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_consistent_and_has_only_enroll_and_status() {
        Cli::command().debug_assert();
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert_eq!(names, ["enroll", "status"]);
    }

    /// Tokens are base64url: one may start with `-`, in either spelling.
    #[test]
    fn a_token_starting_with_a_dash_is_a_token() {
        let fp = "AB".repeat(32);
        for args in [vec!["--token", "-3abc_def"], vec!["--token=-3abc_def"]] {
            let mut argv = vec!["ferry-agent", "enroll", "--gateway", "https://gw:8443"];
            argv.extend(args);
            argv.extend(["--ca-fingerprint", &fp]);
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let Command::Enroll(e) = cli.command else {
                panic!("not enroll")
            };
            assert_eq!(e.token.expose(), "-3abc_def");
        }
    }

    #[test]
    fn a_token_clap_refuses_is_not_echoed_and_debug_redacts_it() {
        let fp = "AB".repeat(32);
        let cli = Cli::try_parse_from([
            "ferry-agent",
            "enroll",
            "--gateway",
            "https://gw:8443",
            "--token",
            "s3cr3t-token",
            "--ca-fingerprint",
            &fp,
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("s3cr3t"));
        // A bad fingerprint is reported; the token next to it is not.
        let e = Cli::try_parse_from([
            "ferry-agent",
            "enroll",
            "--gateway",
            "https://gw:8443",
            "--token",
            "s3cr3t-token",
            "--ca-fingerprint",
            "zz",
        ])
        .unwrap_err();
        assert!(e.use_stderr());
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        // No `run` or `sync` yet.
        assert!(Cli::try_parse_from(["ferry-agent", "run"]).is_err());
    }
}
