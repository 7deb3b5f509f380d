//! A private network for fault-injection tests: one Linux network namespace
//! per node, joined by a bridge, with partitions made by dropping packets.
//!
//! ```text
//!   root namespace (the test: gRPC clients)
//!     mrft<pid>-<seq>r 10.77.X.1/24
//!        |  veth
//!   mrft<pid>-<seq>-hub namespace:  br0 (bridge) ── n1, n2, … (veth ends)
//!        |  veth                                          |
//!   mrft<pid>-<seq>-n1: eth0 10.77.X.11/24   mrft<pid>-<seq>-n2: eth0 10.77.X.12/24  …
//! ```
//!
//! The bridge lives in its own namespace so that nothing configured in the
//! root namespace (a host firewall, `br_netfilter`) sees the nodes' traffic.
//! The only link to the root namespace is one veth for the test process, so
//! clients reach every node whatever the partitions between nodes are.
//!
//! Partitions are nftables rules inside each node's namespace: an `inet`
//! table whose input chain drops packets from, and whose output chain drops
//! packets to, the peers that node is cut from. Only node addresses are ever
//! in those sets, so the client address stays reachable. Dropping (not
//! rejecting) makes a partition look like a silent network: connections
//! stall until they time out, as they do when a switch or a cable fails.
//!
//! Names carry the test process id and the third octet of the subnet is
//! chosen so that it is unused on the host, so concurrent runs do not clash.
//! Everything is removed when the [`Net`] is dropped (also when a test
//! panics); the node processes must be killed before that, which owners
//! ensure by field order. Namespaces left behind by a run that was killed
//! outright are removed by the next run (their owning pid no longer exists).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Prefix of every namespace and root-side link this module creates.
const TAG: &str = "mrft";

/// The first two octets of the private subnets used (10.77.X.0/24).
const NET_PREFIX: [u8; 2] = [10, 77];

/// Name of the nftables table that holds the partition rules.
const TABLE: &str = "multiraft_faults";

/// Serialises network setup within this process (see [`Net::create`]).
static SETUP: Mutex<()> = Mutex::new(());
/// Distinguishes the networks of one process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The namespaces, links and partition rules of one test's network.
pub struct Net {
    tag: String,
    subnet: u8,
    nodes: Vec<u64>,
    /// Namespaces created so far, deleted in reverse order on drop.
    namespaces: Vec<String>,
    /// The veth end in the root namespace, once created.
    root_link: Option<String>,
    /// Directed cuts: packets from `.0` to `.1` are dropped.
    blocked: BTreeSet<(u64, u64)>,
    /// The drop sets last loaded into each node's namespace (input, output).
    applied: BTreeMap<u64, (BTreeSet<u64>, BTreeSet<u64>)>,
}

impl Net {
    /// Builds the network for nodes `1..=nodes`. Returns `Err` with the
    /// reason when this machine cannot host it at all (not root, or network
    /// namespaces unavailable), so the caller can skip; any later setup
    /// failure panics, since then something is broken that should work.
    pub fn create(nodes: u64) -> Result<Net, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".to_string());
        }
        // One network at a time is being set up in this process, so two
        // concurrent tests cannot pick the same free subnet.
        let _setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale();
        let pid = std::process::id();
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes: "mrft" + pid (<= 7 digits)
        // + "-" + seq + "r" for the root-side link.
        assert!(seq < 100, "more than 100 test networks in one process");
        let tag = format!("{TAG}{pid}-{seq}");
        let mut net = Net {
            subnet: free_subnet(pid + seq),
            tag,
            nodes: (1..=nodes).collect(),
            namespaces: Vec::new(),
            root_link: None,
            blocked: BTreeSet::new(),
            applied: BTreeMap::new(),
        };
        // The probe for namespace support: the first namespace created.
        let hub = net.hub();
        run(Command::new("ip").args(["netns", "add", &hub]))
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        net.namespaces.push(hub.clone());
        net.setup()
            .unwrap_or_else(|e| panic!("network namespace setup: {e}"));
        Ok(net)
    }

    fn setup(&mut self) -> Result<(), String> {
        let hub = self.hub();
        ip(&hub, &["link", "set", "lo", "up"])?;
        ip(&hub, &["link", "add", "br0", "type", "bridge"])?;
        ip(&hub, &["link", "set", "br0", "up"])?;

        // The test's own way in: a veth from the root namespace to the bridge.
        let root_link = format!("{}r", self.tag);
        run(Command::new("ip").args([
            "link", "add", &root_link, "type", "veth", "peer", "name", "up0", "netns", &hub,
        ]))?;
        self.root_link = Some(root_link.clone());
        ip(&hub, &["link", "set", "up0", "master", "br0", "up"])?;
        let client = format!("{}/24", self.client_ip());
        run(Command::new("ip").args(["addr", "add", &client, "dev", &root_link]))?;
        run(Command::new("ip").args(["link", "set", &root_link, "up"]))?;

        for id in self.nodes.clone() {
            let ns = self.ns(id);
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            self.namespaces.push(ns.clone());
            let port = format!("n{id}");
            ip(
                &hub,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            ip(&hub, &["link", "set", &port, "master", "br0", "up"])?;
            ip(&ns, &["link", "set", "lo", "up"])?;
            let addr = format!("{}/24", self.ip(id));
            ip(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            // The partition table, with empty drop sets.
            nft(
                &ns,
                &format!(
                    "table inet {TABLE} {{\n\
                     \tset drop_from {{ type ipv4_addr; }}\n\
                     \tset drop_to {{ type ipv4_addr; }}\n\
                     \tchain input {{ type filter hook input priority 0; policy accept; ip saddr @drop_from drop; }}\n\
                     \tchain output {{ type filter hook output priority 0; policy accept; ip daddr @drop_to drop; }}\n\
                     }}\n"
                ),
            )?;
            self.applied.insert(id, Default::default());
        }
        Ok(())
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.tag)
    }

    /// The namespace node `id` runs in.
    pub fn ns(&self, id: u64) -> String {
        format!("{}-n{id}", self.tag)
    }

    /// Node `id`'s address (inside its namespace).
    pub fn ip(&self, id: u64) -> Ipv4Addr {
        assert!(self.nodes.contains(&id), "no node {id} in this network");
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.subnet, 10 + id as u8)
    }

    /// The test process's address (root namespace); never partitioned.
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.subnet, 1)
    }

    /// The command prefix that runs a program inside node `id`'s namespace
    /// (see `support::Node::exec_prefix`).
    pub fn exec_prefix(&self, id: u64) -> Vec<String> {
        ["ip", "netns", "exec"]
            .iter()
            .map(|s| s.to_string())
            .chain([self.ns(id)])
            .collect()
    }

    /// Runs `f` on a thread inside node `id`'s namespace: sockets it
    /// creates belong to that namespace (and stay there).
    pub fn in_ns<T: Send>(&self, id: u64, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns(id));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                    // SAFETY: setns on a namespace file we hold open; it moves
                    // only this thread (which exists for `f` alone) into it.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Drops packets from `from` to `to` (one direction only).
    pub fn cut_one_way(&mut self, from: u64, to: u64) {
        assert!(from != to, "cannot cut node {from} from itself");
        self.blocked.insert((from, to));
        self.apply();
    }

    /// Drops all packets between `a` and `b`, both directions.
    pub fn cut(&mut self, a: u64, b: u64) {
        self.isolate(&[a], &[b]);
    }

    /// Cuts every node of `side` from every node of `other`, both directions.
    pub fn isolate(&mut self, side: &[u64], other: &[u64]) {
        for &a in side {
            for &b in other {
                assert!(a != b, "node {a} is on both sides of a cut");
                self.blocked.insert((a, b));
                self.blocked.insert((b, a));
            }
        }
        self.apply();
    }

    /// Removes every cut.
    pub fn heal_all(&mut self) {
        self.blocked.clear();
        self.apply();
    }

    /// The current cuts, for logs: `1-x-2` (both ways) or `1->2` (one way).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for &(a, b) in &self.blocked {
            if self.blocked.contains(&(b, a)) {
                if a < b {
                    parts.push(format!("{a}-x-{b}"));
                }
            } else {
                parts.push(format!("{a}-x->{b}"));
            }
        }
        if parts.is_empty() {
            "no cuts".to_string()
        } else {
            parts.join(" ")
        }
    }

    /// Loads the drop sets that changed into their nodes' namespaces; each
    /// node's update is one atomic nft transaction.
    fn apply(&mut self) {
        for id in self.nodes.clone() {
            let from: BTreeSet<u64> = self
                .blocked
                .iter()
                .filter(|(_, to)| *to == id)
                .map(|(from, _)| *from)
                .collect();
            let to: BTreeSet<u64> = self
                .blocked
                .iter()
                .filter(|(from, _)| *from == id)
                .map(|(_, to)| *to)
                .collect();
            let wanted = (from, to);
            if self.applied.get(&id) == Some(&wanted) {
                continue;
            }
            let mut script =
                format!("flush set inet {TABLE} drop_from\nflush set inet {TABLE} drop_to\n");
            for (set, peers) in [("drop_from", &wanted.0), ("drop_to", &wanted.1)] {
                if !peers.is_empty() {
                    let addrs: Vec<String> =
                        peers.iter().map(|&p| self.ip(p).to_string()).collect();
                    script.push_str(&format!(
                        "add element inet {TABLE} {set} {{ {} }}\n",
                        addrs.join(", ")
                    ));
                }
            }
            let ns = self.ns(id);
            nft(&ns, &script).unwrap_or_else(|e| panic!("update the cuts of node {id}: {e}"));
            self.applied.insert(id, wanted);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(link) = self.root_link.take() {
            if let Err(e) = run(Command::new("ip").args(["link", "del", &link])) {
                eprintln!("cleanup: {e}");
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", &ns])) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A third octet for 10.77.X.0/24 that no address or route on the host
/// uses yet, starting from one derived from `pid`.
fn free_subnet(pid: u32) -> u8 {
    let used = [
        output(Command::new("ip").args(["-4", "-o", "addr", "show"])),
        output(Command::new("ip").args(["-4", "route", "show", "table", "all"])),
    ]
    .concat();
    let first = (pid % 200) as usize;
    (0..200)
        .map(|i| 20 + ((first + i) % 200) as u8)
        .find(|x| {
            let prefix = format!("{}.{}.{x}.", NET_PREFIX[0], NET_PREFIX[1]);
            !used.contains(&prefix)
        })
        .expect("every 10.77.X.0/24 subnet is in use on this host")
}

/// Removes namespaces (and their root-side links) that a run killed before
/// its destructors ran left behind: ours are `mrft<pid>-<seq>…`, and only
/// those whose pid no longer exists are touched.
fn remove_stale() {
    let list = output(Command::new("ip").args(["netns", "list"]));
    let mut dead = BTreeSet::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(TAG) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        dead.insert(pid.to_string());
        let _ = run(Command::new("ip").args(["netns", "del", name]));
    }
    // Root-side links go with their hub namespace, unless that failed.
    let links = output(Command::new("ip").args(["-o", "link", "show"]));
    for line in links.lines() {
        // "7: mrft123-0r@if2: <BROADCAST,…"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        let pid = name
            .strip_prefix(TAG)
            .and_then(|rest| rest.split_once('-'))
            .map(|(pid, _)| pid);
        if pid.is_some_and(|pid| dead.contains(pid)) {
            let _ = run(Command::new("ip").args(["link", "del", name]));
        }
    }
}

/// `ip -n NS ARGS…`
fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// Runs an nft script inside namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip netns exec {ns} nft: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| format!("write the nft script: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip netns exec {ns} nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip netns exec {ns} nft -f -: {}: {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `cmd` to completion; an error names the command and its output.
fn run(cmd: &mut Command) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The standard output of `cmd`, or nothing if it cannot run.
fn output(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The cuts themselves, checked with UDP datagrams between sockets inside
/// the namespaces: a cut drops exactly the directed paths it names (peer to
/// peer), the test's own address is never cut, healing restores every path,
/// and dropping the network removes its namespaces and links.
#[test]
fn cuts_drop_exactly_the_chosen_paths() {
    let mut net = match Net::create(3) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: needs root and network namespaces ({why})");
            return;
        }
    };
    // A program started through the prefix sees the node's address.
    let prefix = net.exec_prefix(2);
    let addrs = output(
        Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["ip", "-4", "-o", "addr", "show"]),
    );
    assert!(
        addrs.contains(&format!(" {}/24 ", net.ip(2)))
            && !addrs.contains(&format!(" {}/24 ", net.ip(1))),
        "addresses inside {}: {addrs}",
        net.ns(2)
    );

    let mut probes = Probes::new(&net);
    probes.expect(&net, &[]);

    net.cut(1, 2);
    probes.expect(&net, &[(1, 2), (2, 1)]);
    net.heal_all();
    probes.expect(&net, &[]);

    net.cut_one_way(1, 3);
    probes.expect(&net, &[(1, 3)]);
    net.isolate(&[3], &[1, 2]);
    probes.expect(&net, &[(1, 3), (3, 1), (2, 3), (3, 2)]);
    assert_eq!(net.describe(), "1-x-3 2-x-3");
    net.heal_all();
    probes.expect(&net, &[]);

    let tag = net.tag.clone();
    drop(probes);
    drop(net);
    let left = [
        output(Command::new("ip").args(["netns", "list"])),
        output(Command::new("ip").args(["-o", "link", "show"])),
    ]
    .concat();
    assert!(
        !left.contains(&format!("{tag}-")) && !left.contains(&format!("{tag}r")),
        "{tag} namespaces or links left behind:\n{left}"
    );
}

/// One UDP socket per node, in its namespace, and one for the test at the
/// client address (id 0), all on the same port.
struct Probes {
    sockets: BTreeMap<u64, UdpSocket>,
    sent: u64,
    /// Datagrams that must never arrive (their path was cut).
    dropped: BTreeSet<String>,
}

impl Probes {
    const PORT: u16 = 7999;

    fn new(net: &Net) -> Probes {
        let mut sockets = BTreeMap::new();
        let client = UdpSocket::bind((net.client_ip(), Self::PORT)).expect("bind client socket");
        sockets.insert(0, client);
        for &id in &net.nodes {
            let ip = net.ip(id);
            let socket = net.in_ns(id, || UdpSocket::bind((ip, Self::PORT)));
            sockets.insert(
                id,
                socket.unwrap_or_else(|e| panic!("bind {ip} in node {id}: {e}")),
            );
        }
        for socket in sockets.values() {
            // Only a bound for when a datagram that must arrive does not.
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("set_read_timeout");
        }
        Probes {
            sockets,
            sent: 0,
            dropped: BTreeSet::new(),
        }
    }

    fn addr(net: &Net, id: u64) -> (Ipv4Addr, u16) {
        let ip = if id == 0 { net.client_ip() } else { net.ip(id) };
        (ip, Self::PORT)
    }

    /// Sends a datagram on every directed path between the sockets; exactly
    /// the paths in `cut` must lose theirs.
    fn expect(&mut self, net: &Net, cut: &[(u64, u64)]) {
        let ids: Vec<u64> = self.sockets.keys().copied().collect();
        for &from in &ids {
            for &to in &ids {
                if from != to {
                    self.probe(net, from, to, !cut.contains(&(from, to)));
                }
            }
        }
    }

    fn probe(&mut self, net: &Net, from: u64, to: u64, delivers: bool) {
        self.sent += 1;
        let probe = format!("probe {} {from}->{to}", self.sent);
        // A drop in the sender's output chain fails the send (EPERM).
        let _ = self.sockets[&from].send_to(probe.as_bytes(), Self::addr(net, to));
        if delivers {
            self.receive_until(to, &probe);
        } else {
            // The client's path is never cut: once a datagram it sent after
            // the probe has arrived, the probe is not coming.
            let marker = format!("marker {}", self.sent);
            self.sockets[&0]
                .send_to(marker.as_bytes(), Self::addr(net, to))
                .expect("send marker");
            self.dropped.insert(probe.clone());
            let early = self.receive_until(to, &marker);
            assert!(
                !early.contains(&probe),
                "{probe} arrived although the path is cut ({})",
                net.describe()
            );
        }
    }

    /// Reads socket `id` until `wanted` arrives; returns what came before.
    fn receive_until(&self, id: u64, wanted: &str) -> Vec<String> {
        let mut before = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let (n, _) = self.sockets[&id]
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for \"{wanted}\" at node {id}: {e}"));
            let got = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(
                !self.dropped.contains(&got),
                "\"{got}\" arrived late although its path was cut"
            );
            if got == wanted {
                return before;
            }
            before.push(got);
        }
    }
}
