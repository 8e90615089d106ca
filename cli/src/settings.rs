//! Settings shared by every subcommand: broker and backend URLs and the config file, resolved in Celery's
//! order (flag, then `CELERY_BROKER_URL`/`CELERY_RESULT_BACKEND`, then the file, then the default).

use anyhow::Context;
use celeriac_backend::{BackendOptions, ResultBackend};
use celeriac_broker::prelude::*;
use celeriac_broker::sentinel::SentinelOptions;
use celeriac_broker::{BrokerOptions, QueueOrder};
use celeriac_worker::config::CeleryConfig;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The default broker and backend.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Broker URL [env: CELERY_BROKER_URL] (default redis://127.0.0.1:6379/0).
    #[arg(short = 'b', long, global = true, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,
    /// Result backend URL, or `disabled` [env: CELERY_RESULT_BACKEND] (default: the broker URL).
    #[arg(long, global = true, env = "CELERY_RESULT_BACKEND")]
    pub result_backend: Option<String>,
    /// TOML file with Celery setting names (broker_url, task_routes, task_acks_late, ...).
    #[arg(long, global = true, env = "CELERIAC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log level: debug, info, warning, error, critical.
    #[arg(short = 'l', long, global = true, default_value = "warning")]
    pub loglevel: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub log_format: crate::LogFormat,
}

/// The resolved configuration.
pub struct Resolved {
    /// Celery settings with URLs filled in.
    pub config: CeleryConfig,
    /// Broker URL.
    pub broker_url: String,
    /// Backend URL.
    pub backend_url: String,
}

impl GlobalArgs {
    /// Loads the config file and applies URL precedence.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let sections = crate::families::section_names();
        let config = match &self.config {
            Some(path) => CeleryConfig::from_file_with_sections(path, &sections)
                .map_err(anyhow::Error::msg)?,
            None => {
                let mut c = CeleryConfig::default();
                c.overlay_env(&sections, std::env::vars())
                    .map_err(anyhow::Error::msg)?;
                c
            }
        };
        let broker_url = self
            .broker
            .clone()
            .or_else(|| config.broker_url.clone())
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let backend_url = self
            .result_backend
            .clone()
            .or_else(|| config.result_backend.clone())
            .unwrap_or_else(|| {
                // Results go to the broker when it is Redis; with RabbitMQ, as in Celery, none are stored unless
                // a backend (`rpc://`, `redis://...`) is configured.
                if broker_url.starts_with("redis") || broker_url.starts_with("sentinel") {
                    broker_url.clone()
                } else {
                    "disabled".to_string()
                }
            });
        Ok(Resolved {
            config,
            broker_url,
            backend_url,
        })
    }
}

impl Resolved {
    /// Broker options from the config.
    pub fn broker_options(&self) -> BrokerOptions {
        let t = &self.config.broker_transport_options;
        BrokerOptions {
            visibility_timeout: Duration::from_secs_f64(t.visibility_timeout),
            global_keyprefix: t.global_keyprefix.clone(),
            queue_order: match t.queue_order_strategy.as_str() {
                "weighted" => QueueOrder::Weighted(t.queue_weights.clone()),
                _ => QueueOrder::Priority,
            },
            prefetch: 16,
            node_name: None,
            queue_arguments: self.config.queue_arguments(),
            common_queue_arguments: self.config.common_queue_arguments(),
            sentinel: self.broker_sentinel(),
            failover: self.config.broker_failover_strategy,
        }
    }

    /// `broker_transport_options`' Sentinel settings.
    pub fn broker_sentinel(&self) -> SentinelOptions {
        let t = &self.config.broker_transport_options;
        SentinelOptions {
            master_name: t.master_name.clone(),
            sentinel_kwargs: t.sentinel_kwargs.clone(),
        }
    }

    /// `result_backend_transport_options`' Sentinel settings (the broker's when it names no master).
    pub fn backend_sentinel(&self) -> SentinelOptions {
        let t = &self.config.result_backend_transport_options;
        match &t.master_name {
            Some(_) => SentinelOptions {
                master_name: t.master_name.clone(),
                sentinel_kwargs: t.sentinel_kwargs.clone(),
            },
            None => self.broker_sentinel(),
        }
    }

    /// Connects the broker.
    pub async fn broker(&self) -> anyhow::Result<Arc<dyn Broker>> {
        self.broker_with(self.broker_options()).await
    }

    /// Connects the broker with adjusted options (the worker sets its prefetch and node name).
    pub async fn broker_with(&self, options: BrokerOptions) -> anyhow::Result<Arc<dyn Broker>> {
        celeriac_broker::connect(&self.broker_url, options)
            .await
            .with_context(|| {
                format!(
                    "connecting to the broker {}",
                    celeriac_broker::url::redact(&self.broker_url)
                )
            })
    }

    /// Connects the result backend.
    pub async fn backend(&self) -> anyhow::Result<Arc<dyn ResultBackend>> {
        let options = BackendOptions {
            result_expires: (self.config.result_expires > 0)
                .then(|| Duration::from_secs(self.config.result_expires)),
            global_keyprefix: self
                .config
                .result_backend_transport_options
                .global_keyprefix
                .clone(),
            broker_url: Some(self.broker_url.clone()),
            sentinel: self.backend_sentinel(),
        };
        celeriac_backend::connect(&self.backend_url, options)
            .await
            .with_context(|| {
                format!(
                    "connecting to the result backend {}",
                    celeriac_broker::url::redact(&self.backend_url)
                )
            })
    }
}

impl Resolved {
    /// The domain database settings.
    pub fn database(&self) -> celeriac_domain::DatabaseConfig {
        celeriac_domain::DatabaseConfig::new(
            self.config.database_url.clone(),
            self.config.database_admin_url.clone(),
            self.config.database_schema.clone(),
        )
    }

    /// `task_routes` as task name → queue.
    pub fn routes(&self) -> std::collections::HashMap<String, String> {
        self.config
            .task_routes
            .iter()
            .map(|(k, v)| (k.clone(), v.queue().to_string()))
            .collect()
    }

    /// A canvas publisher for this process (`origin` = `gen<pid>@<host>`, as Celery clients).
    pub async fn canvas(&self) -> anyhow::Result<celeriac_canvas::Canvas> {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Ok(celeriac_canvas::Canvas::new(
            self.broker().await?,
            self.backend().await?,
            self.config.task_default_queue.clone(),
            self.routes(),
            format!("gen{}@{host}", std::process::id()),
        )
        .with_sent_events(self.config.task_send_sent_event))
    }
}

/// Splits `-Q a,b` into names.
pub fn split_queues(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_string)
        .collect()
}
