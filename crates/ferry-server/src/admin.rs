//! `ferry stats` and `ferry dlq`: the HTTP admin API from the command line (`--url`, default
//! `http://127.0.0.1:8080`; `FERRY_URL` also sets it). Answers are printed as pretty JSON; an
//! error status prints the server's error and exits with 1.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;

/// Where the server's HTTP API is.
#[derive(Debug, Args)]
pub struct UrlArg {
    /// Base URL of the HTTP API.
    #[arg(
        long,
        global = true,
        env = "FERRY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// User name for HTTP Basic authentication (when the server has anonymous access off).
    #[arg(long, global = true, env = "FERRY_USER")]
    pub user: Option<String>,
    /// Password for HTTP Basic authentication.
    #[arg(long, global = true, env = "FERRY_PASSWORD", requires = "user")]
    pub password: Option<String>,
    /// Trust the CA certificates of this PEM file for an https:// URL (as curl's --cacert).
    #[arg(long, global = true, value_name = "PATH")]
    pub cacert: Option<std::path::PathBuf>,
}

/// `ferry stats [topic]`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub url: UrlArg,
    /// Only this topic's stats.
    pub topic: Option<String>,
    /// Only topics whose name starts with this (a page of them).
    #[arg(long, conflicts_with = "topic")]
    pub prefix: Option<String>,
    /// The page after this topic name (the `next` of the previous answer).
    #[arg(long, conflicts_with = "topic")]
    pub after: Option<String>,
    /// At most this many topics (the server allows 1 to 1000; default 100).
    #[arg(long, conflicts_with = "topic")]
    pub limit: Option<usize>,
    /// `depth`: the topics in use with the most records stored, instead of name order.
    #[arg(long, conflicts_with = "topic")]
    pub sort: Option<String>,
}

/// `ferry dlq <action> <topic>`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub url: UrlArg,
    #[command(subcommand)]
    pub action: DlqAction,
}

/// What to do with a topic's dead letters.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List the dead letters of a topic.
    List {
        /// The topic.
        topic: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Publish dead letters back to their topic.
    Redrive {
        /// The topic.
        topic: String,
        /// At most this many (default: all).
        #[arg(long)]
        max: Option<usize>,
    },
    /// Delete every dead letter of a topic.
    Purge {
        /// The topic.
        topic: String,
    },
}

/// Percent-encodes one path segment (a topic name contains `/`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn call(method: Method, url: String, auth: &UrlArg) -> anyhow::Result<ExitCode> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = &auth.cacert {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificate", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().context("building the HTTP client")?;
    let mut request = client.request(method.clone(), &url);
    if let Some(user) = &auth.user {
        request = request.basic_auth(user, auth.password.as_ref());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the answer")?;
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(body);
    if status.is_success() {
        println!("{pretty}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{method} {url}: {status}\n{pretty}");
        Ok(ExitCode::FAILURE)
    }
}

fn base(url: &UrlArg) -> &str {
    url.url.trim_end_matches('/')
}

/// Runs `ferry stats`.
pub async fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.topic {
        Some(t) => format!("{}/stats/{}", base(&args.url), segment(t)),
        None => {
            let mut query = Vec::new();
            for (key, value) in [
                ("prefix", args.prefix.clone()),
                ("after", args.after.clone()),
                ("limit", args.limit.map(|l| l.to_string())),
                ("sort", args.sort.clone()),
            ] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", segment(&v)));
                }
            }
            if query.is_empty() {
                format!("{}/stats", base(&args.url))
            } else {
                format!("{}/stats?{}", base(&args.url), query.join("&"))
            }
        }
    };
    call(Method::GET, url, &args.url).await
}

/// Runs `ferry dlq`.
pub async fn dlq(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let b = base(&args.url);
    let (method, url) = match &args.action {
        DlqAction::List { topic, max } => (
            Method::GET,
            format!("{b}/topics/{}/dead-letters?max={max}", segment(topic)),
        ),
        DlqAction::Redrive { topic, max } => (
            Method::POST,
            match max {
                Some(m) => format!("{b}/topics/{}/dead-letters/redrive?max={m}", segment(topic)),
                None => format!("{b}/topics/{}/dead-letters/redrive", segment(topic)),
            },
        ),
        DlqAction::Purge { topic } => (
            Method::DELETE,
            format!("{b}/topics/{}/dead-letters", segment(topic)),
        ),
    };
    call(method, url, &args.url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_one_segment() {
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment("plain-1.x"), "plain-1.x");
    }
}
