//! The engine, its epoch ticker, the compiled-component cache, and loading a plugin.
//!
//! One [`PluginHost`] per process: it owns the wasmtime `Engine` (configured once: epoch
//! interruption, optional fuel, wasm stack cap), a thread that advances the epoch every tick
//! (so deadlines hold even when the executor is busy), and the cache of compiled components.
//! Loading checks, in order and before anything runs: the manifest, the component's SHA-256,
//! that it is a component, its world, the `ferry:plugin` version, and every import against the
//! grants. Only then is it linked (with only the granted interfaces) into an `InstancePre`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};

use crate::bindings;
use crate::error::PluginError;
use crate::inspect::{self, Summary};
use crate::manifest::{Capability, Manifest, World};
use crate::sigv4::SigV4;
use crate::state::{
    DeadlineHit, HttpAccess, LogSink, MemoryCapHit, PlanKv, State, StateInit, StderrLog, on_epoch,
};

/// Host-wide settings (engine-level: they apply to every plugin).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where compiled components are kept across restarts; `None` compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// Enable fuel metering (needed for `limits.fuel`; costs some speed on every plugin).
    pub fuel: bool,
    /// Wasm stack cap per call, bytes.
    pub max_wasm_stack: usize,
    /// Epoch tick: deadline resolution and how often a long call yields.
    pub epoch_tick: Duration,
    /// Where plugin log lines go.
    pub log: Arc<dyn LogSink>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            fuel: false,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(10),
            log: Arc::new(StderrLog),
        }
    }
}

/// Loads plugins and runs their calls under limits.
#[derive(Debug)]
pub struct PluginHost {
    pub(crate) engine: Engine,
    pub(crate) config: HostConfig,
    engine_key: String,
    compiled: Mutex<HashMap<String, Component>>,
    stop_ticker: Arc<AtomicBool>,
    pub(crate) http_client: LazyHttpClient,
}

/// The HTTP client of `http` grants, built on first use: building it loads the system's root
/// certificates (hundreds of files), a cost that runs which never reach the network (every
/// disk conversion) should not pay.
#[derive(Debug, Clone, Default)]
pub(crate) struct LazyHttpClient(Arc<std::sync::OnceLock<Result<reqwest::Client, String>>>);

impl LazyHttpClient {
    /// The client: one that never follows redirects, ignores proxy variables and gives up
    /// connecting after 10 s.
    pub(crate) fn get(&self) -> Result<&reqwest::Client, String> {
        self.0
            .get_or_init(|| {
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .connect_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("building the host's HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Feeds `Hash` output into SHA-256, so the cache key does not depend on std's unstable hasher.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// One manifest of a plugin directory and what loading it gave.
pub type DirEntryLoad = (PathBuf, Result<LoadedPlugin, PluginError>);

/// A plugin that passed every check, ready to instantiate (one fresh store per job).
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    pub(crate) inner: Arc<LoadedInner>,
    signer: Option<Arc<SigV4>>,
}

impl LoadedPlugin {
    /// The host signs every HTTP request of this plugin with `signer` (AWS SigV4), so an
    /// adapter reading an AWS API never holds the operator's credentials. The plugin may not
    /// set the signed headers itself. Needs the `http` grant.
    #[must_use]
    pub fn with_http_signer(mut self, signer: SigV4) -> LoadedPlugin {
        self.signer = Some(Arc::new(signer));
        self
    }
}

#[derive(Debug)]
pub(crate) struct LoadedInner {
    pub manifest: Manifest,
    pub name: Arc<str>,
    pub sha256: String,
    pub summary: Summary,
    pub pre: Pre,
    pub config: Arc<std::collections::BTreeMap<String, String>>,
    pub limits: Arc<crate::manifest::Limits>,
    pub related: Arc<[String]>,
}

pub(crate) enum Pre {
    Adapter(bindings::adapter::SourceAdapterPre<State>),
    Hook(bindings::hook::FailoverHookPre<State>),
}

impl std::fmt::Debug for Pre {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pre::Adapter(_) => "Pre::Adapter",
            Pre::Hook(_) => "Pre::Hook",
        })
    }
}

impl LoadedPlugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }

    pub fn summary(&self) -> &Summary {
        &self.inner.summary
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl PluginHost {
    pub fn new(config: HostConfig) -> Result<PluginHost, PluginError> {
        let mut wc = Config::new();
        wc.epoch_interruption(true);
        wc.consume_fuel(config.fuel);
        wc.max_wasm_stack(config.max_wasm_stack);
        wc.async_stack_size(config.max_wasm_stack + (1 << 20));
        let engine = Engine::new(&wc).map_err(|e| PluginError::Host(format!("engine: {e}")))?;

        let mut h = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        h.0.update(env!("CARGO_PKG_VERSION").as_bytes());
        let engine_key = hex::encode(&h.0.finalize()[..8]);

        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, tick) = (engine.clone(), stop.clone(), config.epoch_tick);
        std::thread::Builder::new()
            .name("ferry-plugin-epoch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    e.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Host(format!("starting the epoch ticker: {e}")))?;

        Ok(PluginHost {
            engine,
            config,
            engine_key,
            compiled: Mutex::new(HashMap::new()),
            stop_ticker: stop,
            http_client: LazyHttpClient::default(),
        })
    }

    /// Compile (or fetch from the caches) a component, without any check beyond validity.
    pub fn compile(&self, plugin: &str, wasm: &[u8]) -> Result<(Component, String), PluginError> {
        let sha = sha256_hex(wasm);
        if let Some(c) = self.lock_compiled().get(&sha) {
            return Ok((c.clone(), sha));
        }
        if !wasm.starts_with(b"\0asm") {
            return Err(PluginError::Compile {
                plugin: plugin.into(),
                message: "not a WebAssembly binary (no \\0asm header)".into(),
            });
        }
        if wasm.get(4..8) == Some(&[1, 0, 0, 0]) {
            return Err(PluginError::Compile {
                plugin: plugin.into(),
                message: "a core module, not a component: build for wasm32-unknown-unknown with the wasm-component-ld linker (see sdk/GUIDE.md)".into(),
            });
        }
        let component = match self.cache_path(&sha) {
            Some(path) => match self.load_cached(&path) {
                Some(c) => c,
                None => {
                    let c = self.compile_fresh(plugin, wasm)?;
                    self.store_cached(&path, &c);
                    c
                }
            },
            None => self.compile_fresh(plugin, wasm)?,
        };
        self.lock_compiled().insert(sha.clone(), component.clone());
        Ok((component, sha))
    }

    fn lock_compiled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Component>> {
        self.compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn compile_fresh(&self, plugin: &str, wasm: &[u8]) -> Result<Component, PluginError> {
        Component::new(&self.engine, wasm).map_err(|e| PluginError::Compile {
            plugin: plugin.into(),
            message: format!("{e:#}"),
        })
    }

    /// `<cache>/<engine key>/<sha256>.cwasm`, when a cache directory is configured and safe.
    fn cache_path(&self, sha: &str) -> Option<PathBuf> {
        let root = self.config.cache_dir.as_ref()?;
        let dir = root.join(&self.engine_key);
        if !ensure_private_dir(root) || !ensure_private_dir(&dir) {
            return None;
        }
        Some(dir.join(format!("{sha}.cwasm")))
    }

    #[allow(unsafe_code)]
    fn load_cached(&self, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: wasmtime requires that the file is an unmodified artifact of its own
        // `serialize`. Only this host writes into the cache: the directory is created by us,
        // owned by our uid and not writable by group or others (checked by `cache_path`), and
        // entries are written to a temporary name, synced, then renamed into place, never
        // rewritten, so a mapped file does not change underneath the component. The engine key
        // in the path keeps artifacts of another engine configuration or wasmtime version
        // apart, and wasmtime rejects those itself with an error besides.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(c) => Some(c),
            Err(_) => {
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn store_cached(&self, path: &Path, component: &Component) {
        let Ok(bytes) = component.serialize() else {
            return;
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_private()
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Check and prepare a plugin. `wasm` must hash to `manifest.sha256` when it is set.
    pub fn load(&self, manifest: Manifest, wasm: &[u8]) -> Result<LoadedPlugin, PluginError> {
        manifest
            .validate()
            .map_err(|message| PluginError::Manifest {
                origin: format!("of plugin {}", manifest.name),
                message,
            })?;
        let name: Arc<str> = Arc::from(manifest.name.as_str());
        let (component, sha) = self.compile(&name, wasm)?;
        if let Some(expected) = &manifest.sha256
            && *expected != sha
        {
            return Err(PluginError::Digest {
                plugin: name.to_string(),
                expected: expected.clone(),
                actual: sha,
            });
        }
        let summary = inspect::summarize(&self.engine, &component);
        inspect::check(&name, &summary, manifest.world, &manifest.grants)?;

        let mut linker: Linker<State> = Linker::new(&self.engine);
        let link_err = |e: wasmtime::Error| PluginError::Link {
            plugin: name.to_string(),
            message: format!("{e:#}"),
        };
        use bindings::adapter::ferry::plugin as a;
        use bindings::hook::ferry::plugin as h;
        let g = &manifest.grants;
        a::types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        if g.has(Capability::Log) {
            a::log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        if g.has(Capability::Config) {
            a::config::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        if g.has(Capability::Clock) {
            a::clock::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        if g.has(Capability::Source) {
            a::source::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        if g.has(Capability::Http) {
            a::http::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        if g.has(Capability::Kv) {
            h::kv::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(link_err)?;
        }
        let instance_pre = linker.instantiate_pre(&component).map_err(link_err)?;
        let pre = match manifest.world {
            World::SourceAdapter => Pre::Adapter(
                bindings::adapter::SourceAdapterPre::new(instance_pre).map_err(link_err)?,
            ),
            World::FailoverHook => {
                Pre::Hook(bindings::hook::FailoverHookPre::new(instance_pre).map_err(link_err)?)
            }
        };
        let related: Arc<[String]> = manifest
            .grants
            .source
            .as_ref()
            .map(|s| s.related.clone())
            .unwrap_or_default()
            .into();
        Ok(LoadedPlugin {
            signer: None,
            inner: Arc::new(LoadedInner {
                name,
                sha256: sha,
                summary,
                pre,
                config: Arc::new(manifest.config.clone()),
                limits: Arc::new(manifest.limits.clone()),
                related,
                manifest,
            }),
        })
    }

    /// Load every plugin of a directory: each `*.toml` directly in `dir` is a manifest whose
    /// `component` is relative to it. Results are per manifest, in file-name order, so one bad
    /// plugin does not hide the others; files other than `*.toml` are ignored.
    pub fn load_dir(&self, dir: &Path) -> Result<Vec<DirEntryLoad>, PluginError> {
        let io = |source| PluginError::Io {
            what: "reading plugin directory",
            path: dir.to_path_buf(),
            source,
        };
        let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        manifests.sort();
        let mut out = Vec::with_capacity(manifests.len());
        let mut names = std::collections::HashSet::new();
        for path in manifests {
            let loaded = Manifest::load(&path).and_then(|(m, wasm)| {
                if !names.insert(m.name.clone()) {
                    return Err(PluginError::Manifest {
                        origin: path.display().to_string(),
                        message: format!(
                            "a plugin named {} is already loaded from this directory",
                            m.name
                        ),
                    });
                }
                self.load(m, &wasm)
            });
            out.push((path, loaded));
        }
        Ok(out)
    }

    /// Summarise a component without loading it as a plugin (for `ferry plugin inspect`).
    pub fn inspect(&self, wasm: &[u8]) -> Result<(Summary, String), PluginError> {
        let (component, sha) = self.compile("(inspected)", wasm)?;
        Ok((inspect::summarize(&self.engine, &component), sha))
    }

    /// A fresh store for one job of `plugin`.
    pub(crate) fn new_store(&self, plugin: &LoadedPlugin, kv: Option<PlanKv>) -> Store<State> {
        let p = &plugin.inner;
        let http = p.manifest.grants.http.as_ref().map(|g| HttpAccess {
            allow: g.allow.clone(),
            client: self.http_client.clone(),
            signer: plugin.signer.clone(),
        });
        let state = State::new(StateInit {
            plugin: p.name.clone(),
            limits: p.limits.clone(),
            sink: self.config.log.clone(),
            config: p.config.clone(),
            related: p.related.clone(),
            http,
            kv,
        });
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(on_epoch);
        store
    }
}

/// Arm the per-call limits on `store` before entering the guest.
pub(crate) fn arm(store: &mut Store<State>, fuel_enabled: bool) {
    let deadline = store.data().limits.deadline();
    store.data_mut().deadline = Instant::now() + deadline;
    store.set_epoch_deadline(1);
    if fuel_enabled {
        let budget = store.data().limits.fuel.unwrap_or(u64::MAX);
        let _ = store.set_fuel(budget);
    }
}

/// Turn a failed call into a typed error naming the plugin and the limit.
pub(crate) fn classify(
    store: &Store<State>,
    call: &'static str,
    max_wasm_stack: usize,
    e: wasmtime::Error,
) -> PluginError {
    let st = store.data();
    let plugin = st.plugin.to_string();
    let limits = &st.limits;
    if e.is::<DeadlineHit>() {
        return PluginError::Deadline {
            plugin,
            call,
            limit_ms: limits.deadline_ms,
        };
    }
    if let Some(m) = e.downcast_ref::<MemoryCapHit>() {
        return PluginError::Memory {
            plugin,
            call,
            limit_mib: m.limit >> 20,
            requested: m.requested,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Deadline {
            plugin,
            call,
            limit_ms: limits.deadline_ms,
        },
        Some(Trap::OutOfFuel) => PluginError::Fuel {
            plugin,
            call,
            budget: limits.fuel.unwrap_or(u64::MAX),
        },
        Some(Trap::StackOverflow) => PluginError::Stack {
            plugin,
            call,
            limit_kib: (max_wasm_stack >> 10) as u64,
        },
        Some(Trap::CannotEnterComponent) => PluginError::Poisoned { plugin },
        Some(trap) => {
            let mut message = trap.to_string();
            if let Some(last) = st.last_error_log() {
                message.push_str(&format!(" (its last error log line: {last})"));
            }
            PluginError::Trap {
                plugin,
                call,
                message,
            }
        }
        None => PluginError::Trap {
            plugin,
            call,
            message: format!("{e:#}"),
        },
    }
}

/// Create `dir` (0700) if needed; true when it is a directory owned by us that nobody else can
/// write into.
fn ensure_private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            m.is_dir() && m.uid() == rustix::process::geteuid().as_raw() && m.mode() & 0o022 == 0
        }
        Err(_) => false,
    }
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}
