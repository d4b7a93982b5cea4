//! `flash-moe serve` driven by the official `openai` and `anthropic` Python SDKs, plain HTTP
//! and curl (tests/clients/sdk_clients.py), on the bundled chat model.
//!
//! Needs a Python with both SDKs: `FLASH_MOE_CLIENT_PYTHON` (tools/test.sh sets one up), else
//! `python3`. Without them the test prints why and skips, unless `FLASH_MOE_REQUIRE_CLIENTS=1`
//! (as in CI), where it fails.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "tiny-qwen35moe-chat-4bit";
const KEY: &str = "test-key";
const MAX_CONTEXT: &str = "1024";
const MAX_BODY_MIB: &str = "1";

/// Kills the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client_python() -> Result<String, String> {
    let python = std::env::var("FLASH_MOE_CLIENT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let probe = Command::new(&python).args(["-c", "import openai, anthropic"]).output();
    match probe {
        Ok(out) if out.status.success() => Ok(python),
        Ok(out) => Err(format!(
            "{python} lacks the SDKs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {python}: {e}")),
    }
}

/// Starts the server on a free port and returns it with its base URL.
fn start_server() -> (Server, String) {
    let model = common::repo_root().join("models").join(MODEL);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flash-moe"))
        .args(["serve", "--device", "cpu", "--port", "0", "--api-key", KEY])
        .args(["--max-context", MAX_CONTEXT, "--max-body-mib", MAX_BODY_MIB])
        .arg("--model")
        .arg(&model)
        .stderr(Stdio::piped())
        .spawn()
        .expect("the flash-moe binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let line = lines
            .next()
            .expect("the server prints where it listens")
            .expect("stderr is text");
        if let Some(url) = line.split("on ").nth(1).and_then(|rest| rest.split(' ').next()) {
            let url = url.trim_end_matches("/v1").to_string();
            // Keep draining stderr so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (server, url);
        }
    }
    panic!("the server did not start within a minute");
}

#[test]
fn official_clients_against_the_server() {
    let python = match client_python() {
        Ok(p) => p,
        Err(reason) if std::env::var("FLASH_MOE_REQUIRE_CLIENTS").as_deref() == Ok("1") => {
            panic!("FLASH_MOE_REQUIRE_CLIENTS=1 but {reason}")
        }
        Err(reason) => {
            let _ = writeln!(
                std::io::stderr(),
                "server_clients: SKIPPED, {reason} (tools/test.sh installs them)"
            );
            return;
        }
    };
    let (_server, url) = start_server();
    let script = common::repo_root().join("tests/clients/sdk_clients.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--base-url", &url, "--api-key", KEY, "--model", MODEL])
        .args(["--max-context", MAX_CONTEXT, "--max-body-mib", MAX_BODY_MIB])
        .output()
        .expect("python runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client checks failed:\n{report}");
}
