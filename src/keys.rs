//! `arbiter keys create|list|revoke`: API keys in the database, shared by every API node.
//! A new key is printed once on stdout; only its SHA-256 is stored.

use crate::config::KeysCommand;
use crate::store::api_keys::generate_key;
use crate::store::{now_ms, Scope};

pub async fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create(args) => {
            let scope = Scope::parse(&args.scope).ok_or_else(|| anyhow::anyhow!("unknown scope {:?}", args.scope))?;
            let (store, _, _) = crate::open_store(&args.store).await?;
            let (id, key) = generate_key();
            store.insert_api_key(&id, scope, &key, args.name.as_deref(), now_ms()).await?;
            store.close().await;
            eprintln!("created {scope} key {id}; it is shown once, keep it now:");
            println!("{key}");
        }
        KeysCommand::List(args) => {
            let (store, _, _) = crate::open_store(&args.store).await?;
            let keys = store.list_api_keys().await?;
            store.close().await;
            println!("{:<16}  {:<7}  {:<24}  {:<24}  name", "id", "scope", "created", "revoked");
            for k in keys {
                let revoked = k.revoked_at.map(crate::http::timestamp).unwrap_or_else(|| "-".into());
                println!(
                    "{:<16}  {:<7}  {:<24}  {:<24}  {}",
                    k.id,
                    k.scope,
                    crate::http::timestamp(k.created_at),
                    revoked,
                    k.name.unwrap_or_default()
                );
            }
        }
        KeysCommand::Revoke(args) => {
            let (store, _, _) = crate::open_store(&args.store).await?;
            let done = store.revoke_api_key(&args.id, now_ms()).await?;
            store.close().await;
            anyhow::ensure!(done, "no unrevoked key with id {:?}", args.id);
            eprintln!("revoked key {}", args.id);
        }
    }
    Ok(())
}
