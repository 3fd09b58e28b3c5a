//! Several hosts on one machine: network namespaces, each with a veth pair into one bridge
//! (multicast, so mDNS, crosses it). The test process's own namespace is host 0, joined to the
//! bridge too, so the test reaches every host and the hosts reach it. Needs root and `ip`
//! (iproute2); everything is removed when the [`Lan`] drops.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Lan {
    /// The bridge's namespace.
    switch: String,
    /// Host namespaces; host i (from 1) is `hosts[i - 1]`.
    hosts: Vec<String>,
    /// This namespace's end of its link to the bridge.
    local_link: String,
    subnet: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run `ip` (iproute2; these tests need it and root): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Lan {
    /// A bridge, this namespace as host 0 (10.<s>.0.1... see [`Lan::addr`]) and `hosts` more
    /// hosts, each its own network namespace.
    pub fn new(hosts: usize) -> Lan {
        // Short names: interface names hold at most 15 bytes.
        let tag = format!(
            "{:x}{}",
            std::process::id() % 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let subnet = 100 + (std::process::id() % 50) as u8 + NEXT.load(Ordering::Relaxed) as u8;
        let switch = format!("bsw{tag}");
        let mut lan = Lan {
            switch: switch.clone(),
            hosts: Vec::new(),
            local_link: format!("bl{tag}0"),
            subnet,
        };
        ip(&["netns", "add", &switch]);
        // No IGMP snooping: with no querier on the bridge it would drop mDNS's group traffic.
        ip(&[
            "-n",
            &switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..=hosts {
            let here = format!("bl{tag}{i}");
            let there = format!("bp{tag}{i}");
            ip(&["link", "add", &here, "type", "veth", "peer", "name", &there]);
            ip(&["link", "set", &there, "netns", &switch]);
            ip(&["-n", &switch, "link", "set", &there, "master", "br0", "up"]);
            let addr = format!("{}/24", lan.addr(i));
            if i == 0 {
                ip(&["addr", "add", &addr, "dev", &here]);
                ip(&["link", "set", &here, "up"]);
                continue;
            }
            let ns = format!("bh{tag}{i}");
            ip(&["netns", "add", &ns]);
            lan.hosts.push(ns.clone());
            ip(&["link", "set", &here, "netns", &ns]);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &here]);
            ip(&["-n", &ns, "link", "set", &here, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // Multicast leaves through the LAN link (a namespace has no default route).
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &here]);
        }
        lan
    }

    /// Host `i`'s address (0 is this namespace).
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, i + 1)
    }

    /// The command prefix that runs a program on host `i` (≥ 1).
    pub fn exec(&self, i: usize) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.hosts[i - 1].clone(),
        ]
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.local_link])
            .status();
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
