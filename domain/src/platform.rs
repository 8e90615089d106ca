//! What a task family receives when it registers (platform.md §1): its configuration section, the domain
//! database (tenants), and the metrics registry its series join (served on the worker's `/metrics`).

use crate::config::DatabaseConfig;
use crate::error::DomainError;
use crate::tenant::Tenants;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A family's view of the platform at registration.
#[derive(Debug, Default)]
pub struct Platform {
    peers: Arc<celeriac_task::Peers>,
    database: DatabaseConfig,
    tenants: Option<Arc<Tenants>>,
    sections: BTreeMap<String, toml::Table>,
    metrics: prometheus_client::registry::Registry,
}

impl Platform {
    /// A platform with these settings; `tenants` is the connected domain database (none when
    /// `database_url` is not set).
    pub fn new(
        database: DatabaseConfig,
        tenants: Option<Arc<Tenants>>,
        sections: BTreeMap<String, toml::Table>,
    ) -> Self {
        Self {
            peers: Default::default(),
            database,
            tenants,
            sections,
            metrics: Default::default(),
        }
    }

    /// Shares `peers` with the families (they report the peers they talk to).
    pub fn with_peers(mut self, peers: Arc<celeriac_task::Peers>) -> Self {
        self.peers = peers;
        self
    }

    /// The outside peers' health.
    pub fn peers(&self) -> Arc<celeriac_task::Peers> {
        Arc::clone(&self.peers)
    }

    /// The family's section (`[email]`), typed; `None` when absent. Errors name the section and key.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        self.sections
            .get(name)
            .map(|t| {
                T::deserialize(toml::Value::Table(t.clone())).map_err(|e| {
                    format!("[{name}]: {}", e.to_string().trim_end().replace('\n', " "))
                })
            })
            .transpose()
    }

    /// The database settings.
    pub fn database(&self) -> &DatabaseConfig {
        &self.database
    }

    /// The tenants of the domain database, or the error a task reports when `database_url` is not set.
    pub fn tenants(&self) -> Result<Arc<Tenants>, DomainError> {
        self.tenants
            .clone()
            .ok_or_else(|| DomainError::NotConfigured("database_url".into()))
    }

    /// The registry the family's metrics join.
    pub fn metrics_mut(&mut self) -> &mut prometheus_client::registry::Registry {
        &mut self.metrics
    }

    /// Takes the metrics registry (the worker serves it, with its own series added).
    pub fn into_metrics(self) -> prometheus_client::registry::Registry {
        self.metrics
    }
}
