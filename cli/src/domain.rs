//! `celeriac migrate`, `celeriac tenants` and `celeriac email template`: the domain database from the
//! command line (migrations and tenants as the owner role, templates as the application role through a
//! tenant transaction, like the tasks).

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_domain::admin::{Admin, MigrateOp};
use celeriac_domain::{Db, Tenants};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;

/// `celeriac migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// `up` (default), `down N`, `status` or `fresh` (drops every table of the schema first).
    #[arg(default_value = "up")]
    pub op: String,
    /// For `down`: how many migrations to roll back.
    pub steps: Option<u32>,
}

/// `celeriac tenants`.
#[derive(Debug, Args)]
pub struct TenantsArgs {
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Debug, Subcommand)]
enum TenantsCommand {
    /// Add a tenant; prints its id.
    Add {
        /// Short unique name (lower case letters, digits, `-`, `_`).
        slug: String,
        /// Display name (default: the slug).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tenants.
    List,
    /// Set the tenant's shop (catalog and data-sync source); the token is read from an environment variable and
    /// stored sealed under CELERIAC_SECRET_KEY.
    #[command(name = "set-source")]
    SetSource {
        /// Tenant slug or id.
        slug: String,
        /// The source kind.
        #[arg(long, default_value = "shopify")]
        kind: String,
        /// The shop's base URL (https://shop.myshopify.com).
        #[arg(long)]
        url: String,
        /// The environment variable holding the access token.
        #[arg(long)]
        token_env: String,
        /// The environment variable holding the shop's webhook secret (optional).
        #[arg(long)]
        webhook_secret_env: Option<String>,
        /// The Admin API version.
        #[arg(long, default_value = "2024-07")]
        api_version: String,
    },
}

/// `celeriac email`.
#[derive(Debug, Args)]
pub struct EmailArgs {
    #[command(subcommand)]
    command: EmailCommand,
}

#[derive(Debug, Subcommand)]
enum EmailCommand {
    /// Store a template (`email.template_put`); sources from options or files.
    #[command(name = "template-put")]
    TemplatePut {
        /// Tenant id or slug.
        tenant: String,
        /// Template name.
        name: String,
        /// Locale (`en`, `de-AT`).
        locale: String,
        /// Subject template.
        #[arg(long)]
        subject: String,
        /// Plain-text template.
        #[arg(long, conflicts_with = "text_file")]
        text: Option<String>,
        /// Plain-text template from a file.
        #[arg(long)]
        text_file: Option<PathBuf>,
        /// HTML template.
        #[arg(long, conflicts_with = "html_file")]
        html: Option<String>,
        /// HTML template from a file.
        #[arg(long)]
        html_file: Option<PathBuf>,
    },
    /// Print a template as JSON (`email.template_get`, with the locale fallback).
    #[command(name = "template-get")]
    TemplateGet {
        /// Tenant id or slug.
        tenant: String,
        /// Template name.
        name: String,
        /// Locale wanted.
        #[arg(long)]
        locale: Option<String>,
    },
}

/// `celeriac migrate`.
pub async fn migrate(global: &GlobalArgs, args: MigrateArgs) -> anyhow::Result<i32> {
    let op = match (args.op.as_str(), args.steps) {
        ("up", None) => MigrateOp::Up,
        ("down", Some(n)) => MigrateOp::Down(n),
        ("down", None) => anyhow::bail!(
            "migrate down: say how many migrations to roll back (`celeriac migrate down 1`)"
        ),
        ("status", None) => MigrateOp::Status,
        ("fresh", None) => MigrateOp::Fresh,
        (other, _) => {
            anyhow::bail!("migrate: unknown command {other:?} (use up, down N, status or fresh)")
        }
    };
    let resolved = global.resolve()?;
    let admin = Admin::connect(&resolved.database())
        .await
        .context("connecting as database_admin_url")?;
    let states = admin.migrate(op).await?;
    for s in &states {
        println!(
            "{} {}",
            if s.applied { "applied" } else { "pending" },
            s.name
        );
    }
    Ok(0)
}

/// `celeriac tenants`.
pub async fn tenants(global: &GlobalArgs, args: TenantsArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    if let TenantsCommand::SetSource {
        slug,
        kind,
        url,
        token_env,
        webhook_secret_env,
        api_version,
    } = &args.command
    {
        anyhow::ensure!(
            kind == "shopify",
            "--kind: only shopify is supported (a GraphQL source is not built yet)"
        );
        url::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
        let read = |var: &str| {
            std::env::var(var).with_context(|| format!("the environment variable {var} is not set"))
        };
        let token = read(token_env)?;
        let sealer = celeriac_domain::secret::Sealer::from_env()?;
        let db = Db::connect(&resolved.database())
            .await
            .context("connecting as database_url")?;
        let tenants = Tenants::new(db);
        let tx = tenants.begin(slug).await?;
        let id = tx.tenant().id;
        let secret = webhook_secret_env
            .as_deref()
            .map(|v| {
                read(v).map(|s| sealer.seal(&celeriac_tasks_sync::tasks::webhook_context(&id), &s))
            })
            .transpose()?;
        celeriac_tasks_sync::store::set_source(
            &tx,
            kind,
            url.trim_end_matches('/'),
            api_version,
            sealer.seal(&celeriac_tasks_sync::tasks::token_context(&id), &token),
            secret,
        )
        .await?;
        tx.commit().await?;
        println!("{slug}: {kind} source {url} (API {api_version}); token sealed");
        return Ok(0);
    }
    let admin = Admin::connect(&resolved.database())
        .await
        .context("connecting as database_admin_url")?;
    match args.command {
        TenantsCommand::Add { slug, name } => {
            let id = admin
                .add_tenant(&slug, name.as_deref())
                .await
                .with_context(|| format!("adding tenant {slug:?}"))?;
            println!("{id}");
        }
        TenantsCommand::List => {
            for t in admin.tenants().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    t.id,
                    t.slug,
                    t.name,
                    t.created_at.to_rfc3339()
                );
            }
        }
        TenantsCommand::SetSource { .. } => unreachable!("handled above"),
    }
    Ok(0)
}

fn read(path: &Option<PathBuf>, inline: Option<String>) -> anyhow::Result<Value> {
    Ok(match (path, inline) {
        (Some(p), _) => Value::String(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        (None, Some(s)) => Value::String(s),
        (None, None) => Value::Null,
    })
}

/// `celeriac email`.
pub async fn email(global: &GlobalArgs, args: EmailArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let database = resolved.database();
    let db = Db::connect(&database)
        .await
        .context("connecting as database_url")?;
    let tenants = Tenants::new(db);
    let answer = match args.command {
        EmailCommand::TemplatePut {
            tenant,
            name,
            locale,
            subject,
            text,
            text_file,
            html,
            html_file,
        } => {
            let tx = tenants.begin(&tenant).await?;
            celeriac_tasks_email::tasks::put_template(
                tx,
                &Value::String(name),
                &Value::String(locale),
                &Value::String(subject),
                &read(&text_file, text)?,
                &read(&html_file, html)?,
            )
            .await
        }
        EmailCommand::TemplateGet {
            tenant,
            name,
            locale,
        } => {
            let config: celeriac_tasks_email::EmailConfig = resolved
                .config
                .sections
                .get("email")
                .map(|t| toml::Value::Table(t.clone()).try_into())
                .transpose()
                .map_err(|e: toml::de::Error| anyhow::anyhow!("[email]: {e}"))?
                .unwrap_or_default();
            let tx = tenants.begin(&tenant).await?;
            celeriac_tasks_email::tasks::get_template(
                tx,
                &Value::String(name),
                &locale.map(Value::String).unwrap_or(Value::Null),
                &config.default_locale,
            )
            .await
        }
    };
    match answer {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        Err(e) => anyhow::bail!("{e}"),
    }
}
