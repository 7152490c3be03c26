//! The `sudp` binary: parse the command line, build a typed config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// Secure-UDP streaming gateway: SOCKS5 over TLS, UDP as independently decryptable records.
#[derive(Parser)]
#[command(name = "sudp", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "sudp=debug".
    #[arg(long, global = true, default_value = "info", env = "SUDP_LOG")]
    log: String,
    /// Log line format on stderr: `text` for people, `json` for log collectors (one JSON
    /// object per line: timestamp, level, target, fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SUDP_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The formats of `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// `--check` of `sudp gateway` and `sudp shim`.
#[derive(clap::Args)]
struct CheckFlag {
    /// Validate the configuration (flags and file) and load every file it names
    /// (certificates, keys, users, CA, password files), bind nothing, print a one-line
    /// summary and exit: 0 when the configuration would start, 78 (EX_CONFIG) with the
    /// error otherwise.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args)]
struct GatewayCmd {
    #[command(flatten)]
    check: CheckFlag,
    #[command(flatten)]
    args: sudp::config::GatewayArgs,
}

#[derive(clap::Args)]
struct ShimCmd {
    #[command(flatten)]
    check: CheckFlag,
    #[command(flatten)]
    args: sudp::config::ShimArgs,
}

/// `sudp completions SHELL`.
#[derive(clap::Args)]
struct CompletionsArgs {
    /// The shell to write completions for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `sudp man --out DIR`.
#[derive(clap::Args)]
struct ManArgs {
    /// Directory to write sudp.1 and one page per subcommand (sudp-gateway.1, ...) into;
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the wire limits of this build (record overhead, largest payload, window sizes).
    Limits,
    /// Write a development CA, gateway and client certificates
    Cert(sudp::cert::CertArgs),
    /// Hash a password read on stdin into a users-file line
    Passwd(sudp::auth::PasswdArgs),
    /// Write a new cluster key (seals what the gateways of a cluster share in the store)
    ClusterKey(sudp::store::cli::ClusterKeyArgs),
    /// Operate on a cluster's shared store (Redis): `sudp store purge`
    Store(sudp::store::cli::StoreArgs),
    /// Run the gateway: SOCKS5 over TLS; naked and secure UDP on one relay socket
    Gateway(Box<GatewayCmd>),
    /// Run the client shim: a local SOCKS5 server and port forwards that reach targets
    /// through a gateway, UDP as secure records
    Shim(Box<ShimCmd>),
    /// Measure datagram throughput, loss, latency and CPU per datagram (secure, naked,
    /// direct); `sudp bench reflect` is the far end for runs across machines
    Bench(Box<sudp::bench::BenchArgs>),
    /// Print shell completions for bash, zsh, fish, elvish or powershell on stdout
    Completions(CompletionsArgs),
    /// Write man pages (sudp.1, sudp-gateway.1, ...) generated from these definitions
    Man(ManArgs),
}

/// Exit status of an error that no restart can fix: a configuration that does not
/// validate or load, or a gateway that refuses the shim (EX_CONFIG of sysexits.h; the
/// systemd units in examples/ keep `Restart=` from looping on it).
const EXIT_CONFIG: u8 = 78;

/// An error that no restart can fix (see [`EXIT_CONFIG`]).
#[derive(Debug)]
struct Fatal(anyhow::Error);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Fatal {}

/// Marks `e` as [`Fatal`].
fn fatal(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Fatal(e.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.log_format == LogFormat::Json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<Fatal>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            };
            // `{:#}`: the whole chain of causes on one line. With JSON logs, stderr stays
            // JSON: the error is a log event (the subscriber exists unless `--log` itself
            // was the error, which then goes out as plain text).
            if json && tracing::dispatcher::has_been_set() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            code
        }
    }
}

/// Installs the log subscriber `cli` asks for.
fn init_logs(cli: &Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .map_err(|e| anyhow::anyhow!("flag `--log`: invalid filter {:?}: {e}", cli.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Errors before the subscriber exists go to plain stderr only (see `main`).
    init_logs(&cli).map_err(fatal)?;
    match cli.cmd {
        Cmd::Cert(args) => sudp::cert::run_cert(args),
        Cmd::Passwd(args) => sudp::auth::run_passwd(args),
        Cmd::Gateway(cmd) if cmd.check.check => check_gateway(cmd.args),
        Cmd::Gateway(cmd) => run_gateway(cmd.args),
        Cmd::Shim(cmd) if cmd.check.check => check_shim(cmd.args),
        Cmd::Shim(cmd) => run_shim(cmd.args),
        Cmd::Completions(args) => {
            // Into a buffer first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "sudp", &mut script);
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            match out.write_all(&script).and_then(|()| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => Ok(r?),
            }
        }
        Cmd::Man(args) => write_man_pages(&args.out),
        Cmd::ClusterKey(args) => sudp::store::cli::run_cluster_key(args),
        Cmd::Store(args) => sudp::store::cli::run_store(args),
        Cmd::Bench(args) => runtime()?.block_on(sudp::bench::run_cli(*args, shutdown_signal())),
        Cmd::Limits => {
            use sudp::proto::record;
            println!(
                "record overhead: {} bytes + 1..16 padding",
                record::PREFIX_LEN + record::TAG_LEN
            );
            // PROTOCOL.md §4.6: the largest record a sender makes (a whole number of blocks
            // below the largest datagram), then the datagram bound itself.
            println!("largest record: {} bytes", record::MAX_RECORD);
            println!(
                "largest datagram (UDP payload over IPv4): {} bytes",
                record::MAX_DATAGRAM
            );
            println!(
                "largest plaintext (address header + payload): {} bytes",
                record::MAX_PLAINTEXT
            );
            println!("records per key: {}", record::MAX_RECORDS_PER_KEY);
            println!(
                "replay window: default {}, {}..={}",
                sudp::proto::replay::DEFAULT_WINDOW,
                sudp::proto::replay::MIN_WINDOW,
                sudp::proto::replay::MAX_WINDOW
            );
            Ok(())
        }
    }
}

/// `sudp gateway --check`: everything a start does before it binds.
fn check_gateway(args: sudp::config::GatewayArgs) -> anyhow::Result<()> {
    let config = sudp::config::GatewayConfig::from_args(args).map_err(fatal)?;
    let settings = sudp::gateway::Settings::from_config(&config).map_err(fatal)?;
    println!("config OK: {}", gateway_summary(&config, &settings));
    Ok(())
}

/// `sudp shim --check`: everything a start does before it binds or dials.
fn check_shim(args: sudp::config::ShimArgs) -> anyhow::Result<()> {
    let config = sudp::config::ShimConfig::from_args(args).map_err(fatal)?;
    sudp::shim::ShimSettings::from_config(&config).map_err(fatal)?;
    println!("config OK: {}", shim_summary(&config));
    Ok(())
}

/// What a checked gateway config will do, on one line.
fn gateway_summary(c: &sudp::config::GatewayConfig, s: &sudp::gateway::Settings) -> String {
    use sudp::config::Auth;
    let users = |p: &std::path::Path| {
        let n = s.auth.users.as_ref().map_or(0, |u| u.len());
        format!(
            "users file {} ({n} user{})",
            p.display(),
            if n == 1 { "" } else { "s" }
        )
    };
    let auth = match &c.auth {
        Auth::NoAuth => "none (--no-auth)".to_owned(),
        Auth::Users(p) => users(p),
        Auth::ClientCert(ca) => format!("client certificates from CA {}", ca.display()),
        Auth::UsersOrClientCert { users: p, client_ca } => {
            format!(
                "{} or client certificates from CA {}",
                users(p),
                client_ca.display()
            )
        }
        Auth::Kerberos => "Kerberos".to_owned(),
    };
    let auth = match &c.kerberos {
        Some(k) if c.auth != Auth::Kerberos => format!("{auth}, then Kerberos ({}, GSS-API)", k.service),
        Some(k) => format!("Kerberos ({}, password and GSS-API)", k.service),
        None => auth,
    };
    format!(
        "gateway: control (TLS{}) {}, relay (UDP) {}, certificate {}, auth {auth}, policy {} \
         global rule{}, default {}",
        if c.tls12 { " 1.2/1.3" } else { " 1.3" },
        c.listen,
        c.udp_listen,
        c.cert.display(),
        c.policy.global_rules().len(),
        if c.policy.global_rules().len() == 1 {
            ""
        } else {
            "s"
        },
        if c.policy.denies_by_default() {
            "deny"
        } else {
            "allow (loopback, link-local and unspecified denied)"
        },
    )
}

/// What a checked shim config will do, on one line.
fn shim_summary(c: &sudp::config::ShimConfig) -> String {
    use sudp::config::Trust;
    let gateways: Vec<String> = c.gateways.iter().map(|g| g.to_string()).collect();
    let trust = match &c.trust {
        Trust::Ca(p) => format!("CA {}", p.display()),
        Trust::Pin(pin) => format!("pin {}", sudp::tls::pin_hex(pin)),
    };
    let login = match (&c.login, &c.client_cert) {
        (Some(l), Some((cert, _))) => format!("user {} and client certificate {}", l.user, cert.display()),
        (Some(l), None) => format!("user {}", l.user),
        (None, Some((cert, _))) => format!("client certificate {}", cert.display()),
        (None, None) => "anonymous".to_owned(),
    };
    let socks = c.socks.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let forwards: Vec<String> = c.forwards.iter().map(|f| f.to_string()).collect();
    format!(
        "shim: gateway{} {}, trust {trust}{}, login {login}, socks {socks}, {} forward{}{}",
        if gateways.len() == 1 { "" } else { "s" },
        gateways.join(" "),
        c.server_name
            .as_ref()
            .map_or_else(String::new, |n| format!(" (server name {n})")),
        forwards.len(),
        if forwards.len() == 1 { "" } else { "s" },
        if forwards.is_empty() {
            String::new()
        } else {
            format!(" ({})", forwards.join(", "))
        },
    )
}

/// `sudp man --out DIR`: one page for `sudp` and one per subcommand (`sudp-gateway.1`,
/// `sudp-bench-reflect.1`, ...), as man(1) finds them under `man1/`.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut written = Vec::new();
    let mut stack = vec![(String::from("sudp"), Cli::command())];
    while let Some((name, cmd)) = stack.pop() {
        if cmd.is_hide_set() {
            continue;
        }
        for sub in cmd.get_subcommands() {
            stack.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        // clap wants a `&'static str` for a name: leak the few short page names.
        let cmd = cmd
            .name(&*String::leak(name.clone()))
            .version(env!("CARGO_PKG_VERSION"));
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, page).with_context(|| format!("{}: cannot write", path.display()))?;
        written.push(path);
    }
    for p in written.iter().rev() {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn run_gateway(args: sudp::config::GatewayArgs) -> anyhow::Result<()> {
    let config = sudp::config::GatewayConfig::from_args(args.clone()).map_err(fatal)?;
    let settings = sudp::gateway::Settings::from_config(&config).map_err(fatal)?;
    take_nice(config.nice)?;
    runtime()?.block_on(async {
        let gateway = sudp::gateway::Gateway::bind(settings).await?;
        let shutdown = armed_shutdown_signal().await;
        // Installed before the bound addresses are printed, like the shutdown signals: a
        // SIGHUP from then on reloads instead of killing the process.
        let hangups = hangup_signal()?;
        let reloader = gateway.reloader(&config);
        let reloads = tokio::spawn(serve_hangups(hangups, move || {
            let (reloader, args) = (reloader.clone(), args.clone());
            async move {
                // File reads and parsing block: off the async workers.
                let started = std::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || reloader.reload(args)).await;
                log_reload(
                    "",
                    result.map(|r| r.map(|r| (r.changes, r.needs_restart))),
                    started,
                );
            }
        }));
        println!("control (TLS) {}", gateway.control_addr());
        println!("relay (UDP) {}", gateway.relay_addr());
        if let Some(a) = gateway.metrics_addr() {
            println!("metrics (HTTP) {a}");
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        let r = gateway.run(shutdown).await;
        reloads.abort();
        r?;
        Ok(())
    })
}

fn run_shim(args: sudp::config::ShimArgs) -> anyhow::Result<()> {
    let config = sudp::config::ShimConfig::from_args(args.clone()).map_err(fatal)?;
    let settings = sudp::shim::ShimSettings::from_config(&config).map_err(fatal)?;
    take_nice(config.nice)?;
    runtime()?.block_on(async {
        let shim = sudp::shim::Shim::bind(settings).await?;
        let shutdown = armed_shutdown_signal().await;
        // Installed before the bound addresses are printed (see the gateway).
        let hangups = hangup_signal()?;
        let reloader = std::sync::Arc::new(shim.reloader(&config));
        let reloads = tokio::spawn(serve_hangups(hangups, move || {
            let (reloader, args) = (reloader.clone(), args.clone());
            async move {
                // File reads block: off the async workers.
                let started = std::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || reloader.reload(args)).await;
                log_reload(
                    " (for new connections)",
                    result.map(|r| r.map(|r| (r.changes, r.needs_restart))),
                    started,
                );
            }
        }));
        if let Some(a) = shim.socks_addr() {
            println!("socks {a}");
        }
        for (f, local) in shim.forward_addrs() {
            println!("forward {} {local} -> {}", f.proto, f.target);
        }
        if let Some(a) = shim.metrics_addr() {
            println!("metrics (HTTP) {a}");
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        // The startup probe runs beside the service (a gateway that does not answer must not
        // delay it): a refused login or certificate stops the shim with the reason instead
        // of leaving it to fail every request.
        let probe = shim.probe();
        let refusal = std::sync::Mutex::new(None);
        let stop = async {
            tokio::pin!(shutdown);
            tokio::select! {
                _ = &mut shutdown => {}
                r = probe => match r {
                    Ok(()) => shutdown.await,
                    Err(e) => *refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
                },
            }
        };
        let r = shim.run(stop).await;
        reloads.abort();
        r?;
        if let Some(e) = refusal.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(fatal(anyhow::anyhow!("{e} (at startup)")));
        }
        Ok(())
    })
}

/// Takes the configured nice value (key `nice`), before the runtime starts its threads: on
/// Linux a nice value belongs to a thread, and the threads created after this inherit it.
fn take_nice(nice: Option<i32>) -> anyhow::Result<()> {
    let Some(n) = nice else {
        return Ok(());
    };
    // SAFETY: setpriority takes plain integers; `0` is the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) => " (a value below the inherited one needs CAP_SYS_NICE)",
            // systemd's SystemCallFilter=~@resources, as in examples/*.service.
            Some(libc::EPERM) => {
                " (a seccomp filter refuses setpriority: under systemd use the unit's Nice=)"
            }
            _ => "",
        };
        return Err(fatal(anyhow::anyhow!(
            "key `nice`: cannot take nice value {n}: {e}{hint}"
        )));
    }
    tracing::info!("running at nice value {n}");
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// [`shutdown_signal`], polled once so that its signal handlers are installed before the
/// caller prints what it bound: a SIGTERM sent as soon as those lines appear then stops the
/// process gracefully instead of killing it (the default action of an unhandled SIGTERM).
async fn armed_shutdown_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let mut signal = Box::pin(shutdown_signal());
    tokio::select! {
        biased;
        _ = &mut signal => Box::pin(std::future::ready(())),
        _ = std::future::ready(()) => signal,
    }
}

/// The one log line of a reload: what changed (and what needs a restart), or why nothing
/// did. `scope` follows "configuration reloaded".
fn log_reload<E: std::fmt::Display>(
    scope: &str,
    result: Result<Result<(String, Vec<&'static str>), E>, tokio::task::JoinError>,
    started: std::time::Instant,
) {
    let ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(Ok((changes, restart))) if restart.is_empty() => {
            tracing::info!(
                duration_ms = ms,
                "SIGHUP: configuration reloaded{scope}: {changes}"
            );
        }
        Ok(Ok((changes, restart))) => tracing::warn!(
            duration_ms = ms,
            "SIGHUP: configuration reloaded{scope}: {changes}; changed but needs a restart \
             (running values kept): {}",
            restart.join(", ")
        ),
        Ok(Err(e)) => {
            tracing::error!("SIGHUP: reload failed, the running configuration stays in force: {e}")
        }
        Err(e) => {
            tracing::error!("SIGHUP: reload failed, the running configuration stays in force: {e}")
        }
    }
}

/// A SIGHUP stream, registered now (from here on the signal no longer kills the process).
#[cfg(unix)]
fn hangup_signal() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// No SIGHUP off Unix.
#[cfg(not(unix))]
fn hangup_signal() -> std::io::Result<()> {
    Ok(())
}

/// Runs `on_hangup` for each SIGHUP, one at a time (signals that arrive during one coalesce
/// into the next), until aborted.
#[cfg(unix)]
async fn serve_hangups<F, Fut>(mut hangups: tokio::signal::unix::Signal, on_hangup: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while hangups.recv().await.is_some() {
        on_hangup().await;
    }
}

/// No SIGHUP off Unix: waits forever.
#[cfg(not(unix))]
async fn serve_hangups<F, Fut>(_: (), _: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    std::future::pending::<()>().await
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received: shutting down");
}
