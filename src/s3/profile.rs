//! What the AWS tools' conventions say beyond the `AWS_*` variables that
//! `object_store` reads itself: the profile (`AWS_PROFILE`, else `default`)
//! of the shared config and credentials files, read as the AWS CLI reads
//! them, and the checks that turn a wrong setting into one clear line.
//!
//! Order, as in the AWS SDKs: variables, then the profile, then the
//! instance's role (EC2 metadata, unless `AWS_EC2_METADATA_DISABLED=true`).
//! Only static keys are taken from a profile; one that names a credential
//! process, SSO or a role to assume is refused with the command that exports
//! its keys.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::AmazonS3ConfigKey;

use super::S3Error;

/// No AWS credentials: what to set.
pub(super) const SET_CREDENTIALS: &str =
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile with keys in ~/.aws/credentials";

/// What the client is to be built with, besides what `from_env` reads.
pub(super) struct Settings {
    pub region: String,
    /// `AWS_ALLOW_HTTP`: a plain-http endpoint (a test store) is allowed.
    pub allow_http: bool,
    /// Settings from the profile that no variable gave.
    pub overrides: Vec<(AmazonS3ConfigKey, String)>,
    /// No variable or profile gives credentials: the client asks the EC2
    /// instance metadata service for the instance role's.
    pub instance_role: bool,
}

/// Profile settings that get credentials in ways lazyfs does not follow.
const UNFOLLOWED: [&str; 6] =
    ["credential_process", "sso_session", "sso_start_url", "role_arn", "source_profile", "web_identity_token_file"];

pub(super) fn settings(env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, S3Error> {
    let named = env("AWS_PROFILE");
    let name = named.clone().unwrap_or_else(|| "default".into());
    let home = env("HOME").map(PathBuf::from);
    let file =
        |var: &str, default: &str| env(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)));
    let config_file = file("AWS_CONFIG_FILE", ".aws/config");
    let credentials_file = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_section = if name == "default" { "default".to_string() } else { format!("profile {name}") };
    let mut profile = HashMap::new();
    let mut found = false;
    // The credentials file wins over the config file for the same key.
    for (path, section) in [(&config_file, config_section.as_str()), (&credentials_file, name.as_str())] {
        let Some(path) = path else { continue };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(S3Error::Config(format!("{}: {e}", path.display()))),
        };
        if let Some(values) = parse_ini(&text).remove(section) {
            found = true;
            profile.extend(values);
        }
    }
    if let (Some(named), false) = (&named, found) {
        let files: Vec<String> =
            [&config_file, &credentials_file].into_iter().flatten().map(|p| p.display().to_string()).collect();
        return Err(S3Error::Config(format!("AWS_PROFILE={named}: no such profile in {}", files.join(" or "))));
    }

    let mut overrides = Vec::new();
    let from_env_keys = env("AWS_ACCESS_KEY_ID").is_some() || env("AWS_SECRET_ACCESS_KEY").is_some();
    let from_profile_keys = profile.contains_key("aws_access_key_id");
    if !from_env_keys && from_profile_keys {
        for (key, config) in [
            ("aws_access_key_id", AmazonS3ConfigKey::AccessKeyId),
            ("aws_secret_access_key", AmazonS3ConfigKey::SecretAccessKey),
            ("aws_session_token", AmazonS3ConfigKey::Token),
        ] {
            if let Some(value) = profile.get(key) {
                overrides.push((config, value.clone()));
            }
        }
    }
    let by_other_means =
        ["AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"]
            .iter()
            .any(|var| env(var).is_some());
    let instance_role = !from_env_keys && !from_profile_keys && !by_other_means;
    if instance_role {
        if let Some(key) = UNFOLLOWED.iter().find(|key| profile.contains_key(**key)) {
            return Err(S3Error::Config(format!(
                "AWS profile {name} gets its credentials through {key}, which lazyfs does not follow: export them \
                 first, e.g. `eval \"$(aws configure export-credentials --profile {name} --format env)\"`"
            )));
        }
        if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(S3Error::Config(format!("no AWS credentials: {SET_CREDENTIALS}")));
        }
    }

    let endpoint = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"));
    let endpoint = match endpoint {
        Some(endpoint) => Some(endpoint),
        None => {
            let value = profile.get("endpoint_url").cloned();
            if let Some(value) = &value {
                overrides.push((AmazonS3ConfigKey::Endpoint, value.clone()));
            }
            value
        }
    };
    // The client takes any text and panics on the first request if it is not a URL.
    let is_url = |e: &str| reqwest::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    if let Some(endpoint) = endpoint.as_ref().filter(|e| !is_url(e)) {
        return Err(S3Error::Config(format!(
            "the endpoint {endpoint} is not a URL: give https://HOST[:PORT] (or http://HOST:PORT with \
             AWS_ALLOW_HTTP=true for a plain-http test store)"
        )));
    }
    let allow_http = env("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if let Some(endpoint) = endpoint.filter(|e| e.starts_with("http://") && !allow_http) {
        return Err(S3Error::Config(format!(
            "the endpoint {endpoint} is plain http: set AWS_ALLOW_HTTP=true to use it (a test store), or give https://"
        )));
    }
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| profile.get("region").cloned())
        .unwrap_or_else(|| "us-east-1".into());
    Ok(Settings { region, allow_http, overrides, instance_role })
}

/// The sections of an AWS config or credentials file, each a map of its
/// keys. Comments (`#`, `;`) and indented sub-settings (`s3 =` followed by
/// indented lines) are skipped.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            let section = sections.get_mut(section).expect("entered above");
            section.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.get(name).cloned()
    }

    fn has(settings: &Settings, key: AmazonS3ConfigKey, value: &str) -> bool {
        settings.overrides.iter().any(|(k, v)| *k == key && v == value)
    }

    #[test]
    fn the_profile_fills_in_what_the_variables_do_not_say() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/config"),
            "[default]\nregion = eu-west-3\n\n[profile lab]\nregion = garage\nendpoint_url = https://s3.lab:3900\n\
             s3 =\n  addressing_style = path\n# a comment\n[profile sso]\nsso_session = corp\n",
        )
        .unwrap();
        std::fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n\
             [lab]\naws_access_key_id=GKLAB\naws_secret_access_key=slab\naws_session_token = tlab\n",
        )
        .unwrap();
        let home = home.path().to_str().unwrap();

        let s = settings(&with(&[("HOME", home)])).unwrap();
        assert_eq!(s.region, "eu-west-3");
        assert!(has(&s, AmazonS3ConfigKey::AccessKeyId, "AKDEFAULT"), "{:?}", s.overrides);

        let s = settings(&with(&[("HOME", home), ("AWS_PROFILE", "lab")])).unwrap();
        assert_eq!(s.region, "garage");
        assert!(has(&s, AmazonS3ConfigKey::AccessKeyId, "GKLAB"));
        assert!(has(&s, AmazonS3ConfigKey::Token, "tlab"));
        assert!(has(&s, AmazonS3ConfigKey::Endpoint, "https://s3.lab:3900"));

        // Variables win over the profile.
        let s = settings(&with(&[
            ("HOME", home),
            ("AWS_PROFILE", "lab"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "senv"),
            ("AWS_REGION", "us-west-2"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ALLOW_HTTP", "true"),
        ]))
        .unwrap();
        assert_eq!(s.region, "us-west-2");
        assert!(s.allow_http);
        assert!(s.overrides.is_empty(), "{:?}", s.overrides);

        let err = settings(&with(&[("HOME", home), ("AWS_PROFILE", "nope")])).err().expect("refused").to_string();
        assert!(err.contains("AWS_PROFILE=nope: no such profile"), "{err}");
        let err = settings(&with(&[("HOME", home), ("AWS_PROFILE", "sso")])).err().expect("refused").to_string();
        assert!(err.contains("sso_session") && err.contains("export-credentials --profile sso"), "{err}");
    }

    #[test]
    fn plain_http_and_no_credentials_are_said_before_any_request() {
        let err = settings(&with(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:3900"), ("AWS_ACCESS_KEY_ID", "a")]))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("AWS_ALLOW_HTTP=true"), "{err}");
        let err = settings(&with(&[("AWS_EC2_METADATA_DISABLED", "true")])).err().expect("refused").to_string();
        assert!(err.starts_with("no AWS credentials"), "{err}");
        assert!(settings(&with(&[])).is_ok(), "the instance's role is tried last");
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_said_before_any_request() {
        for endpoint in ["127.0.0.1:3900", "localhost:3900", "s3.example.com", "ftp://127.0.0.1/", "http://"] {
            let vars = [("AWS_ENDPOINT_URL", endpoint), ("AWS_ALLOW_HTTP", "true"), ("AWS_ACCESS_KEY_ID", "a")];
            let err = settings(&with(&vars)).err().expect("refused").to_string();
            assert!(err.contains("is not a URL") && err.contains("https://"), "{endpoint}: {err}");
        }
        let vars = [("AWS_ENDPOINT_URL_S3", "localhost:3900"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:3900")];
        assert!(settings(&with(&vars)).is_err(), "the endpoint used is the S3 one");
        for endpoint in ["http://127.0.0.1:3900", "https://s3.example.com", "http://localhost:3900/"] {
            let vars = [("AWS_ENDPOINT_URL", endpoint), ("AWS_ALLOW_HTTP", "true"), ("AWS_ACCESS_KEY_ID", "a")];
            assert!(settings(&with(&vars)).is_ok(), "{endpoint}");
        }
    }
}
