//! The layered TOML configuration (the CLI's loader): a file's text into every role's config,
//! then each role validated.

use baton::config::{ClusterConfig, RoleName, load_text, to_toml};

/// A config file's text, loaded as `--config` loads it (every table, unknown keys refused),
/// then each role validated. A file that loads prints each role's table (`baton config
/// print`), which loads back to the same settings.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = load_text("fuzz.toml", text) else {
        return;
    };
    for role in RoleName::ALL {
        let _ = loaded.validate(role);
        let printed = match to_toml(&loaded.config, role) {
            Ok(printed) => printed,
            Err(e) => panic!("the {} table of a loaded config prints: {e}", role.key()),
        };
        let again = match load_text("printed.toml", &printed) {
            Ok(again) => again,
            Err(e) => panic!("a printed {} table loads back: {e}\n{printed}", role.key()),
        };
        assert_eq!(
            table(&again.config, role),
            table(&loaded.config, role),
            "a printed {} table loads back to the same settings:\n{printed}",
            role.key()
        );
    }
}

fn table(config: &ClusterConfig, role: RoleName) -> serde_json::Value {
    let mut all = serde_json::to_value(config).expect("a config serializes");
    all[role.key()].take()
}
