//! `baton keys new`: a fresh API key for the client APIs, and the `[[coordinator.auth.keys]]`
//! table that admits it. The key is printed once and stored nowhere; the configuration holds
//! only its SHA-256.

#[derive(clap::Args)]
pub struct NewKeyArgs {
    /// The key's name in logs and metrics (ASCII letters, digits and -_.).
    #[arg(long, default_value = "client")]
    pub name: String,
    /// Requests per minute the key may start (default: no limit).
    #[arg(long)]
    pub requests_per_minute: Option<u32>,
    /// Requests of the key in flight at once (default: no limit).
    #[arg(long)]
    pub max_concurrent: Option<u32>,
}

pub fn new_key(args: NewKeyArgs) -> anyhow::Result<()> {
    let bytes: [u8; 24] = rand::random();
    let key = format!("bt-{}", baton_core::hex::encode(&bytes));
    let entry = baton_coordinator::ApiKeyConfig {
        name: args.name,
        sha256: baton_core::hex::encode(&baton_coordinator::key_digest(&key)),
        requests_per_minute: args.requests_per_minute,
        max_concurrent: args.max_concurrent,
    };
    // The same checks start-up makes, so a bad name fails here.
    baton_coordinator::AuthConfig {
        keys: vec![entry.clone()],
        insecure_remote: false,
    }
    .validate(&[])
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("the key (give it to the client; it is not stored anywhere):");
    println!("{key}");
    eprintln!("\nadd to the coordinator's configuration:\n");
    let mut table = toml::map::Map::new();
    table.insert(
        "keys".into(),
        toml::Value::Array(vec![toml::Value::try_from(&entry)?]),
    );
    let mut auth = toml::map::Map::new();
    auth.insert("auth".into(), toml::Value::Table(table));
    let mut doc = toml::map::Map::new();
    doc.insert("coordinator".into(), toml::Value::Table(auth));
    eprint!("{}", toml::to_string(&toml::Value::Table(doc))?);
    Ok(())
}
