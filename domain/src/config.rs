//! Where the domain database is: the application role's URL (workers), the owner's (migrations, tenants),
//! and the schema the tables live in.

/// The domain database settings (top-level keys of the config file, platform.md §6).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseConfig {
    /// `database_url`: PostgreSQL as the application role.
    pub url: Option<String>,
    /// `database_admin_url`: PostgreSQL as the owner role.
    pub admin_url: Option<String>,
    /// `database_schema`: the schema of the domain tables (its search path).
    pub schema: Option<String>,
    /// Pool size of a worker.
    pub max_connections: u32,
}

impl DatabaseConfig {
    /// Settings with the default pool size (16).
    pub fn new(url: Option<String>, admin_url: Option<String>, schema: Option<String>) -> Self {
        Self {
            url,
            admin_url,
            schema,
            max_connections: 16,
        }
    }
}

/// A URL with its password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The user name of a PostgreSQL URL (the role a worker connects as).
pub fn role_of(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty())
}
