//! `baton certs`: a development certificate authority and one certificate per role, for mutual
//! TLS between the coordinator and the workers (`[<role>.tls]`). Each certificate names its
//! role (`baton-coordinator`, `baton-prefill`, `baton-decode`: what a client checks, whatever
//! address it dialled) and serves as both client and server identity. For production, issue
//! the same names from your own CA.
//!
//! It also writes a cluster key (`cluster.key`, 32 random bytes as hex): KV links prove it at
//! connect and it signs adverts and events (`discovery.cluster_key_file`), so the one config
//! file it writes (`tls.toml`) secures every hop: gRPC by certificates, KV links by the key.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The roles that get a certificate.
const ROLES: [&str; 3] = ["coordinator", "prefill", "decode"];

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Directory to write into (created; existing files are not overwritten).
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    if args.days == 0 {
        anyhow::bail!("--days: must be at least 1");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let mut files = vec![
        args.out.join("ca.pem"),
        args.out.join("ca.key"),
        args.out.join("tls.toml"),
        args.out.join("cluster.key"),
    ];
    for role in ROLES {
        files.push(args.out.join(format!("{role}.pem")));
        files.push(args.out.join(format!("{role}.key")));
    }
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        anyhow::bail!(
            "{} exists: baton certs does not overwrite a CA or key (choose another --out)",
            existing.display()
        );
    }
    let (not_before, not_after) = validity(args.days);
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "baton development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).context("sign the CA")?;
    write(&args.out.join("ca.pem"), &ca_cert.pem(), false)?;
    write(&args.out.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);
    for role in ROLES {
        let name = baton_core::tls::server_name(role);
        let mut params = CertificateParams::new(vec![name.clone()]).context("certificate names")?;
        params.distinguished_name.push(DnType::CommonName, &name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().with_context(|| format!("generate {role}'s key"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("sign {role}'s certificate"))?;
        write(&args.out.join(format!("{role}.pem")), &cert.pem(), false)?;
        write(
            &args.out.join(format!("{role}.key")),
            &key.serialize_pem(),
            true,
        )?;
    }
    write(&args.out.join("cluster.key"), &cluster_key(), true)?;
    // One config file for every role: `baton up --config DIR/tls.toml` runs a secured cluster.
    let absolute = std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone());
    let dir = absolute.display();
    let mut tables = String::new();
    for role in ROLES {
        tables.push_str(&format!(
            "[{role}.tls]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/{role}.pem\"\nkey = \"{dir}/{role}.key\"\n\n\
             [{role}.discovery]\ncluster_key_file = \"{dir}/cluster.key\"\n\n"
        ));
    }
    write(&args.out.join("tls.toml"), &tables, false)?;
    println!(
        "wrote a development CA and certificates for {} to {}",
        ROLES.join(", "),
        args.out.display()
    );
    println!(
        "every role's configuration: {} (baton up --config {0})",
        args.out.join("tls.toml").display()
    );
    println!("keep {dir}/ca.key away from the cluster: it signs new identities");
    println!(
        "{dir}/cluster.key authenticates KV links and signs adverts: copy it to every machine of the cluster"
    );
    Ok(())
}

/// 32 random bytes (the thread's CSPRNG, seeded from the OS), as hex: a cluster key file.
fn cluster_key() -> String {
    format!("{}\n", baton_core::hex::encode(&rand::random::<[u8; 32]>()))
}

/// From an hour ago (clocks differ a little between machines) for `days` days.
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// Writes `text` to a new file; private keys readable by the owner only.
fn write(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}
