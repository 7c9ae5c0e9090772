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
    /// Run the controller: ModelDeployments become Deployments and Services
    /// placed on the GPUs that fit.
    Controller(Box<ControllerArgs>),
    /// Run the OpenAI-compatible gateway: members' keys, exact stints, routing
    /// to ready replicas.
    Gateway(GatewayArgs),
    /// Benchmarks that print comparable figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Offline simulations of the controller's decisions.
    #[command(subcommand)]
    Simulate(SimulateCommand),
    /// Models for air-gapped sites: pull from the Hub, serve as a mirror.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Check manifests of copyhold resources for what the API server's schema
    /// cannot express (the controller reports the same as conditions).
    Validate {
        /// Manifest files (YAML, several documents allowed).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch a repository (verified, resumable) into DIR/OWNER/NAME.
    Pull {
        /// `OWNER/NAME`.
        repo: String,
        /// The directory to carry (a disk).
        #[arg(long)]
        to: PathBuf,
        #[arg(long, default_value = "main")]
        revision: String,
        /// Glob allow-list (repeatable; default: config, tokenizer, safetensors).
        #[arg(long = "file")]
        files: Vec<String>,
        /// The Hub or a mirror.
        #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
        endpoint: String,
        /// Token for gated or private repositories.
        #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Serve DIR (as `pull` lays it out) as a Hub mirror.
    Serve {
        dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:8090")]
        listen: std::net::SocketAddr,
        /// Append every request to this file.
        #[arg(long)]
        access_log: Option<PathBuf>,
    },
}

fn run_models(cmd: ModelsCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cmd {
            ModelsCommand::Pull {
                repo,
                to,
                revision,
                files,
                endpoint,
                token,
            } => {
                let dir = copyhold::hub_cli::pull(&endpoint, &repo, &revision, &files, token, &to)
                    .await?;
                println!("{}", dir.display());
                Ok(())
            }
            ModelsCommand::Serve {
                dir,
                listen,
                access_log,
            } => copyhold::hub_cli::serve(&dir, listen, access_log).await,
        }
    })
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// Address to serve the API (and /healthz, /readyz) on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "COPYHOLD_GATEWAY_LISTEN")]
    listen: std::net::SocketAddr,
    /// Address to serve /metrics on: a port of its own, never the API's
    /// (per-member series name tenants and members).
    #[arg(
        long,
        default_value = "0.0.0.0:9090",
        env = "COPYHOLD_GATEWAY_METRICS_ADDR"
    )]
    metrics_addr: std::net::SocketAddr,
    /// Watch only this namespace's quotas, keys and models.
    #[arg(long, env = "COPYHOLD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Comma-separated namespaces whose members' key Secrets (labelled
    /// `copyhold.dev/api-key=true`) are read; default: where the rest is
    /// watched. Secrets without the label are never read.
    #[arg(long, env = "COPYHOLD_KEY_NAMESPACES", value_delimiter = ',')]
    key_namespaces: Vec<String>,
    /// Name of this replica in the register; a per-process suffix is added.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    body_limit: usize,
    /// Seconds a client has to send a request's line and headers (also the
    /// longest a kept-alive connection may sit idle).
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a client has to send a whole request body; then a 408.
    #[arg(long, default_value_t = 60)]
    body_timeout: u64,
    /// Client connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Largest non-streamed engine answer buffered, in bytes; larger is a
    /// 502 (streamed answers are passed on and not bounded).
    #[arg(long, default_value_t = 64 << 20)]
    max_response_bytes: usize,
    /// Seconds to wait for an engine's response headers.
    #[arg(long, default_value_t = 300)]
    first_byte_timeout: u64,
    /// Seconds of silence tolerated inside an engine's response.
    #[arg(long, default_value_t = 120)]
    idle_timeout: u64,
    /// Seconds a replica that refused a connection is left alone.
    #[arg(long, default_value_t = 10)]
    eject_seconds: u64,
    /// Comma-separated CIDRs whose clients count as inside the cluster, for
    /// registers of `cluster` visibility: the Pod and Service CIDRs, and
    /// loopback (by the TCP peer address; X-Forwarded-For is not trusted).
    #[arg(
        long,
        default_value = "127.0.0.0/8,::1/128",
        env = "COPYHOLD_REGISTER_CLUSTER_CIDRS",
        value_parser = copyhold::gateway::register::ClusterNets::parse
    )]
    register_cluster_cidrs: copyhold::gateway::register::ClusterNets,
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// Run an EnergyBudget's ladder over supply and demand traces (CSV with
    /// a `time,watts` header, RFC 3339 times) beside two baselines: no
    /// ladder, and a static power cap at the day's mean supply.
    Budget {
        /// The EnergyBudget manifest (its ceiling, margin and policy are used).
        #[arg(long)]
        budget: PathBuf,
        /// Renewable supply trace.
        #[arg(long)]
        supply: PathBuf,
        /// Demand trace: what the covered nodes would draw unconstrained.
        #[arg(long)]
        demand: PathBuf,
        /// Evaluation step.
        #[arg(long, default_value = "1m", value_parser = parse_step)]
        step: std::time::Duration,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Share of the demand drawn by essential models.
        #[arg(long, default_value_t = 0.25)]
        essential_share: f64,
        /// Share of the demand drawn by standard models (the rest is deferrable).
        #[arg(long, default_value_t = 0.35)]
        standard_share: f64,
        /// Share of a shed priority's draw its minReplicas keep.
        #[arg(long, default_value_t = 0.25)]
        min_fraction: f64,
        /// Joules one deferred request would have used.
        #[arg(long, default_value_t = 500.0)]
        joules_per_request: f64,
    },
}

fn parse_step(s: &str) -> Result<std::time::Duration, String> {
    copyhold::resources::parse_duration(s).map_err(|e| e.to_string())
}

fn run_simulate(cmd: SimulateCommand) -> anyhow::Result<()> {
    match cmd {
        SimulateCommand::Budget {
            budget,
            supply,
            demand,
            step,
            json,
            essential_share,
            standard_share,
            min_fraction,
            joules_per_request,
        } => {
            use copyhold::energy::simulate;
            for (name, v) in [
                ("--essential-share", essential_share),
                ("--standard-share", standard_share),
                ("--min-fraction", min_fraction),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&v),
                    "{name} must lie in 0..=1, given {v}"
                );
            }
            anyhow::ensure!(
                essential_share + standard_share <= 1.0,
                "--essential-share + --standard-share must not exceed 1"
            );
            anyhow::ensure!(
                joules_per_request > 0.0,
                "--joules-per-request must be positive"
            );
            let eb = simulate::read_budget(&budget)?;
            let supply = simulate::read_csv(&supply)?;
            let demand = simulate::read_csv(&demand)?;
            let plant = simulate::Plant {
                essential_share,
                standard_share,
                min_fraction,
                joules_per_request,
            };
            let report = simulate::simulate(&eb, &supply, &demand, step, plant)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", simulate::table(&report));
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Added latency and throughput of the gateway against calling the
    /// upstream directly and against LiteLLM's proxy, side by side.
    Gateway {
        /// Concurrent clients, one measurement each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        clients: Vec<usize>,
        /// Seconds per target and concurrency.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Completion tokens per answer.
        #[arg(long, default_value_t = 16)]
        tokens: i64,
        /// The stand-in upstream's delay per token in ms (0 measures the
        /// proxies' own cost; a few ms is closer to a real engine).
        #[arg(long, default_value_t = 0)]
        token_delay_ms: u64,
        /// Stream the answers.
        #[arg(long)]
        stream: bool,
        /// LiteLLM's `litellm` executable (installed as PEERS.md says).
        #[arg(long, env = "COPYHOLD_LITELLM")]
        litellm: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time until N ModelDeployments are Placed, the controller's peak RSS
    /// and API requests per object, against the cluster KUBECONFIG names.
    Controller {
        /// ModelDeployments to create (one GPU each).
        #[arg(long, default_value_t = 500)]
        objects: usize,
        /// GPUs of the simulated fleet, when fewer than the objects: so
        /// many are Placed, the rest refused with InsufficientGPUs (e.g.
        /// `--objects 50 --room 40`). One per object when absent.
        #[arg(long)]
        room: Option<usize>,
        /// GPUs on each simulated bench node.
        #[arg(long, default_value_t = 8)]
        gpus_per_node: u32,
        /// Creates in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn run_bench(cmd: BenchCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cmd {
            BenchCommand::Gateway {
                clients,
                seconds,
                tokens,
                token_delay_ms,
                stream,
                litellm,
                json,
            } => {
                let client = kube::Client::try_default().await?;
                let b = copyhold::bench::gateway::GatewayBench {
                    clients,
                    seconds,
                    tokens,
                    token_delay_ms,
                    stream,
                    litellm,
                    json,
                };
                let figs = copyhold::bench::gateway::run(client, b.clone()).await?;
                if b.json {
                    println!("{}", serde_json::to_string_pretty(&figs)?);
                } else {
                    print!("{}", copyhold::bench::gateway::table(&figs, &b));
                }
                Ok(())
            }
            BenchCommand::Controller {
                objects,
                room,
                gpus_per_node,
                concurrency,
                json,
            } => {
                let client = kube::Client::try_default().await?;
                let bench = copyhold::bench::controller::ControllerBench {
                    objects,
                    room,
                    gpus_per_node,
                    concurrency,
                    json,
                };
                let f = copyhold::bench::controller::controller(client, bench).await?;
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    println!("copyhold bench controller");
                    println!("  objects                     {}", f.objects);
                    println!("  simulated nodes             {}", f.nodes);
                    println!("  GPUs in the fleet           {}", f.gpus);
                    println!(
                        "  time until all decided      {:.2} s   (goal <= 10 s)",
                        f.seconds_until_all_decided
                    );
                    println!(
                        "  Placed                      {}   (expected {})",
                        f.placed,
                        f.objects.min(f.gpus)
                    );
                    println!(
                        "  InsufficientGPUs            {}   (expected {})",
                        f.insufficient_gpus,
                        f.objects.saturating_sub(f.gpus)
                    );
                    println!("  Pods                        {}", f.pods);
                    println!(
                        "  longest a Pod waited unbound {:.2} s  (goal <= 10 s)",
                        f.longest_unbound_seconds
                    );
                    println!("  Pods still unbound          {}", f.pods_unbound);
                    println!(
                        "  controller peak RSS         {:.1} MB  (goal <= 100 MB)",
                        f.controller_peak_rss_mb
                    );
                    println!("  API requests                {}", f.api_requests);
                    println!(
                        "  API requests per object     {:.2}",
                        f.api_requests_per_object
                    );
                    for (kind, n) in &f.api_requests_by_kind {
                        println!(
                            "    {kind:<38} {n:>6}  {:>6.2} per object",
                            *n as f64 / f.objects.max(1) as f64
                        );
                    }
                }
                Ok(())
            }
        }
    })
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "COPYHOLD_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Take part in leader election (one controller acts, others stand by).
    #[arg(long, env = "COPYHOLD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "COPYHOLD_LEASE_NAME",
        default_value = "copyhold-controller"
    )]
    lease_name: String,
    /// This candidate's identity (the Pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader lease lasts without renewal.
    #[arg(long, env = "COPYHOLD_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Image of the copyhold inference node.
    #[arg(long, env = "COPYHOLD_NODE_IMAGE")]
    node_image: Option<String>,
    /// Image of vLLM's OpenAI server.
    #[arg(long, env = "COPYHOLD_VLLM_IMAGE")]
    vllm_image: Option<String>,
    /// `--device` passed to copyhold-node (cuda on GPU nodes; cpu for tests).
    #[arg(long, env = "COPYHOLD_NODE_DEVICE", default_value = "cuda")]
    node_device: String,
    /// Secret (key `token`, in each ModelDeployment's namespace) mounted
    /// into every copyhold-node Pod as its `--admin-token-file`; also the
    /// token EnergyBudgets' power caps send when they name none.
    #[arg(long, env = "COPYHOLD_NODE_ADMIN_TOKEN_SECRET")]
    node_admin_token_secret: Option<String>,
    /// RuntimeClass of the inference Pods: `nvidia` where the NVIDIA
    /// container runtime is a RuntimeClass (k3s, the GPU Operator).
    #[arg(long, env = "COPYHOLD_NODE_RUNTIME_CLASS")]
    node_runtime_class: Option<String>,
    /// Secret (in each ModelDeployment's namespace) the kubelet pulls the
    /// engine images with; repeatable.
    #[arg(
        long = "node-image-pull-secret",
        env = "COPYHOLD_NODE_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    node_image_pull_secrets: Vec<String>,
    /// Node directory of the model cache for huggingFace sources (a
    /// hostPath, writable by uid 65532).
    #[arg(
        long,
        env = "COPYHOLD_MODEL_CACHE_DIR",
        default_value = "/var/lib/copyhold/models"
    )]
    model_cache_dir: String,
    /// A ReadWriteMany PVC (in each ModelDeployment's namespace) to use as
    /// the model cache instead of the node directory.
    #[arg(long, env = "COPYHOLD_MODEL_CACHE_PVC")]
    model_cache_pvc: Option<String>,
    /// Size limit of the model cache in bytes (LRU eviction of unused models).
    #[arg(long, env = "COPYHOLD_MODEL_CACHE_MAX_BYTES")]
    model_cache_max_bytes: Option<u64>,
    /// Reconcile only this namespace (all when absent).
    #[arg(long, env = "COPYHOLD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile only the EnergyBudgets this label selector matches (all when
    /// absent): budgets are cluster-scoped, so two installs on one cluster
    /// must not both act on the same budget.
    #[arg(long, env = "COPYHOLD_BUDGET_SELECTOR")]
    budget_selector: Option<String>,
    /// Seconds between resyncs of a healthy object.
    #[arg(long, env = "COPYHOLD_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Reconciles run at once, per kind. Each in flight holds its objects,
    /// request and response bodies: unbounded, 500 new models meant 500 at
    /// once and the memory of all of them.
    #[arg(long, env = "COPYHOLD_MAX_CONCURRENT_RECONCILES", default_value_t = 16)]
    max_concurrent_reconciles: u16,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let json = std::env::var("COPYHOLD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    init_tracing();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let config = kube::Config::infer().await?;
        let mut defaults = copyhold::serving::workload::EngineDefaults {
            node_device: args.node_device,
            admin_token_secret: args.node_admin_token_secret.filter(|s| !s.is_empty()),
            runtime_class: args.node_runtime_class.filter(|s| !s.is_empty()),
            image_pull_secrets: args
                .node_image_pull_secrets
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            model_cache: match args.model_cache_pvc.filter(|s| !s.is_empty()) {
                Some(c) => copyhold::serving::model_cache::ModelCacheVolume::Pvc(c),
                None => {
                    copyhold::serving::model_cache::ModelCacheVolume::HostPath(args.model_cache_dir)
                }
            },
            model_cache_max_bytes: args.model_cache_max_bytes,
            ..Default::default()
        };
        if let Some(i) = args.node_image {
            defaults.copyhold_image = i;
        }
        if let Some(i) = args.vllm_image {
            defaults.vllm_image = i;
        }
        let identity = args.identity.unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "copyhold".into());
            format!("{host}-{}", std::process::id())
        });
        let settings = copyhold::controller::Settings {
            metrics_addr: args.metrics_addr,
            leader_election: args.leader_election,
            lease_namespace: args.lease_namespace,
            lease_name: args.lease_name,
            identity,
            timing: copyhold::leader::Timing {
                lease_duration: std::time::Duration::from_secs(args.lease_seconds.max(2)),
                renew_every: std::time::Duration::from_secs((args.lease_seconds / 5).max(1)),
                retry_every: std::time::Duration::from_secs((args.lease_seconds / 5).max(1)),
                call_timeout: std::time::Duration::from_secs((args.lease_seconds / 3).max(1)),
            },
            defaults,
            watch_namespace: args.watch_namespace,
            budget_selector: args.budget_selector,
            resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
            concurrency: args.max_concurrent_reconciles.max(1),
        };
        copyhold::controller::run(config, settings).await
    })
}

fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    init_tracing();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default().await?;
        let base = args
            .identity
            .unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()));
        // A restarted process must not adopt its predecessor's slices.
        let suffix: u32 = rand::random();
        let settings = copyhold::gateway::Settings {
            listen: args.listen,
            metrics_listen: args.metrics_addr,
            watch_namespace: args.watch_namespace,
            key_namespaces: args.key_namespaces,
            identity: format!("{base}-{suffix:08x}"),
            body_limit: args.body_limit,
            header_timeout: std::time::Duration::from_secs(args.header_timeout.max(1)),
            body_timeout: std::time::Duration::from_secs(args.body_timeout.max(1)),
            max_connections: args.max_connections.max(1),
            max_response_bytes: args.max_response_bytes,
            first_byte_timeout: std::time::Duration::from_secs(args.first_byte_timeout.max(1)),
            idle_timeout: std::time::Duration::from_secs(args.idle_timeout.max(1)),
            eject_for: std::time::Duration::from_secs(args.eject_seconds),
            register_cluster_nets: args.register_cluster_cidrs,
            ..Default::default()
        };
        copyhold::gateway::run(client, settings).await
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(cmd) => match run_bench(cmd) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Gateway(args) => match run_gateway(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold gateway: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Simulate(cmd) => match run_simulate(cmd) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold simulate: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Models(cmd) => match run_models(cmd) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold models: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Controller(args) => match run_controller(*args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("copyhold controller: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
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
