//! The deployment files in `deploy/` against the binary they deploy:
//! - the systemd unit passes `systemd-analyze verify` (where available),
//!   and every variable its environment file sets is one `serve` reads;
//! - the Kubernetes manifests use flags, variables and ports the binary
//!   has, the Job's members match the StatefulSet's pod names, and the
//!   StatefulSet's command really starts node N+1 on pod N.
//!
//! Not tested here (no daemon or cluster on the test machine): building
//! the Dockerfile, and running the unit or the manifests for real.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use crate::support::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `multiraft <cmd> --help`.
fn help(cmd: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args([cmd, "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `MULTIRAFT_*` variables `text` mentions.
fn variables(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("MULTIRAFT_") && w.len() > "MULTIRAFT_".len())
        .map(str::to_owned)
        .collect()
}

/// The `--flags` `text` mentions.
fn flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_systemd_unit_verifies_and_sets_real_variables() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/multiraft.service")).unwrap();
    let env = std::fs::read_to_string(repo("deploy/systemd/multiraft.env")).unwrap();
    let serve = help("serve");
    for v in variables(&unit).union(&variables(&env)) {
        assert!(serve.contains(v.as_str()), "serve reads no {v}");
    }
    for needed in [
        "LimitMEMLOCK=infinity",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        note("systemd-analyze not installed: the unit was not verified");
        return;
    }
    // The unit as installed, pointing at this build and the example file.
    let dir = test_dir();
    let local = unit.replace("/usr/local/bin/multiraft", BIN).replace(
        "/etc/multiraft/multiraft.env",
        &repo("deploy/systemd/multiraft.env").display().to_string(),
    );
    let path = dir.path().join("multiraft.service");
    std::fs::write(&path, local).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        output_text(&out)
    );
}

/// Every document of a manifest file.
fn manifests(file: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&std::fs::read_to_string(repo(file)).unwrap())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn texts(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_fit_the_binary() {
    let docs = manifests("deploy/kubernetes/multiraft.yaml");
    let sts = of_kind(&docs, "StatefulSet")[0];
    let name = sts["metadata"]["name"].as_str().unwrap();
    let service = sts["spec"]["serviceName"].as_str().unwrap();
    let replicas = sts["spec"]["replicas"].as_i64().unwrap();
    let headless = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(service))
        .expect("the StatefulSet's service");
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );

    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let command = [texts(&container["command"]), texts(&container["args"])].concat();
    let script = command.last().unwrap().clone();
    let serve = help("serve");
    assert!(script.contains("multiraft serve"), "{script}");
    for f in flags(&script) {
        assert!(serve.contains(&f), "serve has no {f}");
    }
    let env: Vec<(String, String)> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (k, _) in env.iter().filter(|(k, _)| k.starts_with("MULTIRAFT_")) {
        assert!(serve.contains(k.as_str()), "serve reads no {k}");
    }
    let api_port = |v: &str| v.rsplit(':').next().unwrap().parse::<i64>().unwrap();
    let api = env.iter().find(|(k, _)| k == "MULTIRAFT_API_ADDR").unwrap();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(api_port(&api.1)),
            "{probe} does not ask the API port"
        );
    }

    // The Job bootstraps exactly the StatefulSet's pods, by their names.
    let job = manifests("deploy/kubernetes/bootstrap-job.yaml");
    let job = of_kind(&job, "Job")[0];
    let job_script = texts(&job["spec"]["template"]["spec"]["containers"][0]["args"]).concat();
    let bootstrap = help("bootstrap");
    for f in flags(&job_script) {
        assert!(bootstrap.contains(&f), "bootstrap has no {f}");
    }
    for i in 0..replicas {
        let member = format!("{}={name}-{i}.{service}:7101", i + 1);
        assert!(job_script.contains(&member), "the Job lacks {member}");
    }

    // The StatefulSet's command on pod 2 starts node 3.
    let dir = test_dir();
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(BIN, bin_dir.join("multiraft")).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = dir.path().join("pod.log");
    let mut pod = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("PATH", path)
        .env("HOSTNAME", format!("{name}-2"))
        .env("MULTIRAFT_API_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MULTIRAFT_RAFT_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MULTIRAFT_DATA_DIR", dir.path().join("data"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the pod's node to start",
        async || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("node ready")),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = pod.kill().await;
    assert!(text.contains("node_id=3"), "{text}");
}
