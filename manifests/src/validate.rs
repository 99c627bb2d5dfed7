//! Checks beyond syntax: names, versions, hashes, URLs, selectors, probes and waves.
//!
//! Every check runs and every problem is returned, so a person fixes a file in one pass.

use std::collections::{BTreeMap, HashSet};

use crate::error::FieldError;
use crate::path::FieldPath;
use crate::types::*;

/// Every problem of one manifest, in document order.
pub fn validate(state: &DesiredState) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let root = FieldPath::root();
    let meta = root.key("metadata");
    check_dns_label(
        &mut errors,
        &meta.key("name"),
        &state.metadata.name,
        "metadata.name",
    );
    check_labels(&mut errors, &meta.key("labels"), &state.metadata.labels);

    let spec = root.key("spec");
    check_selector(&mut errors, &spec.key("selector"), &state.spec.selector);

    let components = spec.key("components");
    if state.spec.components.is_empty() {
        errors.push(
            FieldError::new(components.clone(), "at least one component is required")
                .hint("list the services, drivers and packages this group should run"),
        );
    }
    let mut seen = HashSet::new();
    for (i, component) in state.spec.components.iter().enumerate() {
        let path = components.index(i);
        if !seen.insert(component.name.as_str()) {
            errors.push(
                FieldError::new(
                    path.key("name"),
                    format!("duplicate component name `{}`", component.name),
                )
                .hint("a component name is unique on a node; rename or merge the two entries"),
            );
        }
        check_component(&mut errors, &path, component);
    }

    let probes = spec.key("probes");
    let mut seen = HashSet::new();
    for (i, probe) in state.spec.probes.iter().enumerate() {
        let path = probes.index(i);
        if !seen.insert(probe.name.as_str()) {
            errors.push(
                FieldError::new(
                    path.key("name"),
                    format!("duplicate probe name `{}`", probe.name),
                )
                .hint("give every probe its own name"),
            );
        }
        check_probe(&mut errors, &path, probe);
    }

    check_rollout(&mut errors, &spec.key("rollout"), &state.spec.rollout);
    errors
}

/// True for a DNS label: lowercase letters, digits and `-`, alphanumeric at both ends, 1–63 characters.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn check_dns_label(errors: &mut Vec<FieldError>, path: &FieldPath, name: &str, what: &str) {
    if !is_dns_label(name) {
        let suggestion = suggest_dns_label(name);
        let mut hint = "use lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters".to_string();
        if is_dns_label(&suggestion) && suggestion != name {
            hint = format!("{hint}, for example `{suggestion}`");
        }
        errors.push(
            FieldError::new(
                path.clone(),
                format!("`{name}` is not a valid {what} (a DNS label)"),
            )
            .hint(hint),
        );
    }
}

fn suggest_dns_label(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    mapped.trim_matches('-').chars().take(63).collect()
}

/// Service names whose unit (`shoal-<name>.service`) is one of shoal's own daemons.
pub const RESERVED_SERVICE_NAMES: [&str; 2] = ["nodelet", "apiserver"];

/// True for a component name: usable as a directory name and a dpkg or module name.
pub fn is_component_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'+')
        })
}

fn is_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// True for a Kubernetes-style label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(is_dns_label)
                && is_label_name(name)
        }
        None => is_label_name(key),
    }
}

/// True for a label value: empty, or a label name.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

const LABEL_KEY_HINT: &str = "a label key is `name` or `prefix/name`: letters, digits, '-', '_' and '.', at most 63 characters, alphanumeric at both ends";
const LABEL_VALUE_HINT: &str = "a label value is empty or letters, digits, '-', '_' and '.', at most 63 characters, alphanumeric at both ends";

fn check_labels(errors: &mut Vec<FieldError>, path: &FieldPath, labels: &BTreeMap<String, String>) {
    for (key, value) in labels {
        if !is_label_key(key) {
            errors.push(
                FieldError::new(path.key(key), format!("`{key}` is not a valid label key"))
                    .hint(LABEL_KEY_HINT),
            );
        }
        if !is_label_value(value) {
            errors.push(
                FieldError::new(
                    path.key(key),
                    format!("`{value}` is not a valid label value"),
                )
                .hint(LABEL_VALUE_HINT),
            );
        }
    }
}

fn check_selector(errors: &mut Vec<FieldError>, path: &FieldPath, selector: &LabelSelector) {
    check_labels(errors, &path.key("matchLabels"), &selector.match_labels);
    for (i, requirement) in selector.match_expressions.iter().enumerate() {
        let path = path.key("matchExpressions").index(i);
        if !is_label_key(&requirement.key) {
            errors.push(
                FieldError::new(
                    path.key("key"),
                    format!("`{}` is not a valid label key", requirement.key),
                )
                .hint(LABEL_KEY_HINT),
            );
        }
        match requirement.operator {
            SelectorOperator::In | SelectorOperator::NotIn if requirement.values.is_empty() => {
                errors.push(
                    FieldError::new(
                        path.key("values"),
                        format!(
                            "operator {:?} needs at least one value",
                            requirement.operator
                        ),
                    )
                    .hint("list the values, e.g. `values: [aarch64]`"),
                );
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist
                if !requirement.values.is_empty() =>
            {
                errors.push(
                    FieldError::new(
                        path.key("values"),
                        format!("operator {:?} takes no values", requirement.operator),
                    )
                    .hint("remove `values`, or use In / NotIn to compare values"),
                );
            }
            _ => {}
        }
        for (j, value) in requirement.values.iter().enumerate() {
            if !is_label_value(value) {
                errors.push(
                    FieldError::new(
                        path.key("values").index(j),
                        format!("`{value}` is not a valid label value"),
                    )
                    .hint(LABEL_VALUE_HINT),
                );
            }
        }
    }
}

fn check_component(errors: &mut Vec<FieldError>, path: &FieldPath, component: &Component) {
    if !is_component_name(&component.name) {
        errors.push(
            FieldError::new(
                path.key("name"),
                format!("`{}` is not a valid component name", component.name),
            )
            .hint("use lowercase letters, digits, '-', '_', '.' and '+', starting with a letter or digit, at most 63 characters"),
        );
    }
    if component.kind == ComponentKind::Service
        && RESERVED_SERVICE_NAMES.contains(&component.name.as_str())
    {
        errors.push(
            FieldError::new(
                path.key("name"),
                format!("`{}` is reserved: a service runs as the systemd unit shoal-<name>.service, and shoal-{}.service is shoal's own daemon", component.name, component.name),
            )
            .hint("give the service another name"),
        );
    }
    let present = component.state == ComponentState::Present;
    match (&component.version, present) {
        (None, true) => errors.push(
            FieldError::new(path.key("version"), "missing required field `version`")
                .hint("pin a version, or set `state: absent` to remove the component"),
        ),
        (Some(version), _) => check_version(errors, &path.key("version"), component.kind, version),
        (None, false) => {}
    }
    match (&component.artifact, component.kind, present) {
        (None, ComponentKind::Service | ComponentKind::Driver, true) => errors.push(
            FieldError::new(path.key("artifact"), format!("a {} needs an `artifact`", component.kind))
                .hint("add `artifact: {url: \"https://…\", sha256: \"<64 hex>\"}`; only packages can come from apt without one"),
        ),
        (Some(artifact), ..) => check_artifact(errors, &path.key("artifact"), artifact),
        _ => {}
    }
    let settings = [
        (
            "service",
            component.service.is_some(),
            ComponentKind::Service,
        ),
        ("driver", component.driver.is_some(), ComponentKind::Driver),
        (
            "package",
            component.package.is_some(),
            ComponentKind::Package,
        ),
    ];
    for (field, set, kind) in settings {
        if set && kind != component.kind {
            errors.push(
                FieldError::new(
                    path.key(field),
                    format!(
                        "`{field}` settings on a component of kind {}",
                        component.kind
                    ),
                )
                .hint(format!("remove `{field}`, or change `kind` to {field}")),
            );
        }
    }
    match (&component.service, component.kind, present) {
        (None, ComponentKind::Service, true) => errors.push(
            FieldError::new(path.key("service"), "a service needs `service.exec`")
                .hint("add `service: {exec: [\"bin/program\", \"--flag\"]}`"),
        ),
        (Some(service), ComponentKind::Service, _) => {
            let exec = path.key("service").key("exec");
            if service.exec.is_empty() || service.exec[0].trim().is_empty() {
                errors.push(
                    FieldError::new(exec.clone(), "`exec` needs at least a program")
                        .hint("the first element is the program, relative to the unpacked artifact or absolute"),
                );
            } else if service.exec[0].split('/').any(|part| part == "..") {
                errors.push(
                    FieldError::new(exec.index(0), "the program path must not contain `..`").hint(
                        "name a program inside the artifact (`bin/agent`) or an absolute path",
                    ),
                );
            }
            if u64::from(service.start_seconds) > MAX_SECONDS {
                errors.push(too_long(
                    path.key("service").key("startSeconds"),
                    "startSeconds",
                    service.start_seconds.into(),
                ));
            }
            for (field, name) in [("user", &service.user), ("group", &service.group)] {
                if let Some(name) = name {
                    if let Err(why) = account_name(name) {
                        errors.push(
                            FieldError::new(path.key("service").key(field), why).hint(format!(
                                "a {field} name as in /etc/{} (letters, digits, '_', '-', '.'; at most 32), or a number",
                                if field == "user" { "passwd" } else { "group" }
                            )),
                        );
                    }
                }
            }
            for key in service.env.keys() {
                let valid = !key.is_empty()
                    && !key.as_bytes()[0].is_ascii_digit()
                    && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    errors.push(
                        FieldError::new(
                            path.key("service").key("env").key(key),
                            format!("`{key}` is not a valid environment variable name"),
                        )
                        .hint("use letters, digits and '_', not starting with a digit"),
                    );
                }
            }
        }
        _ => {}
    }
    if let (Some(driver), ComponentKind::Driver) = (&component.driver, component.kind) {
        if let Some(module) = &driver.module {
            if !is_component_name(module) {
                errors.push(
                    FieldError::new(
                        path.key("driver").key("module"),
                        format!("`{module}` is not a valid module name"),
                    )
                    .hint("kernel module names use lowercase letters, digits, '_' and '-'"),
                );
            }
        }
        for (i, param) in driver.params.iter().enumerate() {
            if !param.contains('=') || param.starts_with('=') || param.contains(char::is_whitespace)
            {
                errors.push(
                    FieldError::new(
                        path.key("driver").key("params").index(i),
                        format!("`{param}` is not a module parameter"),
                    )
                    .hint("write parameters as `name=value`, one per element"),
                );
            }
        }
    }
    if let (Some(package), ComponentKind::Package) = (&component.package, component.kind) {
        if let Some(name) = &package.name {
            if !is_debian_package_name(name) {
                errors.push(
                    FieldError::new(
                        path.key("package").key("name"),
                        format!("`{name}` is not a valid Debian package name"),
                    )
                    .hint("lowercase letters, digits, '+', '-' and '.', at least two characters, starting with a letter or digit"),
                );
            }
        }
    } else if component.kind == ComponentKind::Package
        && component.package.is_none()
        && !is_debian_package_name(&component.name)
        && is_component_name(&component.name)
    {
        errors.push(
            FieldError::new(
                path.key("name"),
                format!("`{}` is not a valid Debian package name", component.name),
            )
            .hint("set `package: {name: <dpkg name>}` when the component name is not the package name"),
        );
    }
}

/// True for a Debian package name (policy §5.6.1).
pub fn is_debian_package_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

fn check_version(
    errors: &mut Vec<FieldError>,
    path: &FieldPath,
    kind: ComponentKind,
    version: &str,
) {
    match kind {
        ComponentKind::Service | ComponentKind::Driver => {
            if let Err(err) = semver::Version::parse(version) {
                let hint = if version.split('.').count() < 3 {
                    format!(
                        "services and drivers use semantic versions such as `{}`",
                        pad_semver(version)
                    )
                } else {
                    "services and drivers use semantic versions such as `2.4.1` or `1.0.0-rc.1`"
                        .to_string()
                };
                errors.push(
                    FieldError::new(
                        path.clone(),
                        format!("`{version}` is not a semantic version ({err})"),
                    )
                    .hint(hint),
                );
            }
        }
        ComponentKind::Package => {
            if let Err(reason) = check_debian_version(version) {
                errors.push(
                    FieldError::new(
                        path.clone(),
                        format!("`{version}` is not a Debian version: {reason}"),
                    )
                    .hint("packages use Debian versions: [epoch:]upstream[-revision], such as `2023.03-1` or `1:2.4.1-0ubuntu1`"),
                );
            }
        }
    }
}

fn pad_semver(version: &str) -> String {
    let mut parts: Vec<&str> = version.split('.').collect();
    while parts.len() < 3 {
        parts.push("0");
    }
    parts.join(".")
}

/// Checks Debian version syntax (deb-version(7)); returns the reason it is invalid.
pub fn check_debian_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("it is empty".into());
    }
    let (epoch, rest) = match version.split_once(':') {
        Some((epoch, rest)) => (Some(epoch), rest),
        None => (None, version),
    };
    if let Some(epoch) = epoch {
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            return Err("the epoch before ':' must be a number".into());
        }
    }
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((upstream, revision)) => (upstream, Some(revision)),
        None => (rest, None),
    };
    if !upstream.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return Err("the upstream version must start with a digit".into());
    }
    let upstream_ok = upstream.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'+' | b'~')
            || (b == b'-' && revision.is_some())
    });
    if !upstream_ok {
        return Err("the upstream version may contain only letters, digits and . + ~ (and - when a revision follows)".into());
    }
    if let Some(revision) = revision {
        if revision.is_empty()
            || !revision
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~'))
        {
            return Err(
                "the revision after the last '-' may contain only letters, digits and . + ~".into(),
            );
        }
    }
    Ok(())
}

fn check_artifact(errors: &mut Vec<FieldError>, path: &FieldPath, artifact: &Artifact) {
    check_url(
        errors,
        &path.key("url"),
        &artifact.url,
        &["http", "https", "file"],
    );
    let sha = &artifact.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        let what = if sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            format!("got {} characters", sha.len())
        } else {
            "got characters that are not hexadecimal".to_string()
        };
        errors.push(
            FieldError::new(
                path.key("sha256"),
                format!("expected 64 hexadecimal characters, {what}"),
            )
            .hint("compute it with `sha256sum FILE`"),
        );
    }
    if artifact.size == Some(0) {
        errors.push(
            FieldError::new(
                path.key("size"),
                "an artifact of 0 bytes cannot be a valid file",
            )
            .hint("give the file's size in bytes (`stat -c %s FILE`), or leave `size` out"),
        );
    }
}

/// Replaces node variables (`${NAME}`, filled in by each nodelet from its `--var`) with a
/// placeholder, so a templated URL or address is checked for everything but the variable.
pub fn without_node_vars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        match rest[start..].find('}') {
            Some(end) => {
                out.push_str(&rest[..start]);
                out.push('1');
                rest = &rest[start + end + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

fn check_url(errors: &mut Vec<FieldError>, path: &FieldPath, text: &str, schemes: &[&str]) {
    let checked = without_node_vars(text);
    match url::Url::parse(&checked) {
        Err(err) => errors.push(
            FieldError::new(path.clone(), format!("`{text}` is not a URL ({err})")).hint(format!(
                "write a full URL with one of the schemes {}",
                schemes.join(", ")
            )),
        ),
        Ok(url) if !schemes.contains(&url.scheme()) => errors.push(
            FieldError::new(
                path.clone(),
                format!("unsupported URL scheme `{}`", url.scheme()),
            )
            .hint(format!("use one of {}", schemes.join(", "))),
        ),
        Ok(url) if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) => errors
            .push(
                FieldError::new(path.clone(), format!("`{text}` has no host"))
                    .hint("write a full URL such as `https://artifacts.example.com/x.tar.gz`"),
            ),
        Ok(_) => {}
    }
}

fn check_probe(errors: &mut Vec<FieldError>, path: &FieldPath, probe: &Probe) {
    check_dns_label(errors, &path.key("name"), &probe.name, "probe name");
    let set: Vec<&str> = [
        ("http", probe.http.is_some()),
        ("tcp", probe.tcp.is_some()),
        ("exec", probe.exec.is_some()),
        ("resource", probe.resource.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match set.len() {
        0 => errors.push(
            FieldError::new(path.clone(), "a probe needs one check")
                .hint("add one of `http`, `tcp`, `exec` or `resource`"),
        ),
        1 => {}
        _ => errors.push(
            FieldError::new(
                path.clone(),
                format!("a probe has exactly one check, found {}", set.join(", ")),
            )
            .hint("split it into one probe per check"),
        ),
    }
    if let Some(http) = &probe.http {
        check_url(
            errors,
            &path.key("http").key("url"),
            &http.url,
            &["http", "https"],
        );
        if let Some(status) = http.expected_status {
            if !(100..=599).contains(&status) {
                errors.push(
                    FieldError::new(
                        path.key("http").key("expectedStatus"),
                        format!("{status} is not an HTTP status"),
                    )
                    .hint("use a status from 100 to 599"),
                );
            }
        }
    }
    if let Some(tcp) = &probe.tcp {
        let address = without_node_vars(&tcp.address);
        let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            errors.push(
                FieldError::new(
                    path.key("tcp").key("address"),
                    format!("`{}` is not a host:port address", tcp.address),
                )
                .hint("write it like `127.0.0.1:9100` or `[::1]:9100`"),
            );
        }
    }
    if let Some(exec) = &probe.exec {
        if exec.command.is_empty() || exec.command[0].trim().is_empty() {
            errors.push(
                FieldError::new(
                    path.key("exec").key("command"),
                    "`command` needs at least a program",
                )
                .hint("write it as a list, e.g. `[ip, link, show, can0]`; no shell is involved"),
            );
        }
    }
    if let Some(resource) = &probe.resource {
        let thresholds = [
            (
                "memoryUsedPercentBelow",
                resource.memory_used_percent_below,
                100.0,
            ),
            (
                "cpuUsedPercentBelow",
                resource.cpu_used_percent_below,
                100.0,
            ),
            (
                "diskUsedPercentBelow",
                resource.disk_used_percent_below,
                100.0,
            ),
            (
                "temperatureCelsiusBelow",
                resource.temperature_celsius_below,
                200.0,
            ),
        ];
        if thresholds.iter().all(|(_, value, _)| value.is_none()) {
            errors.push(
                FieldError::new(path.key("resource"), "a resource probe needs a threshold")
                    .hint("set memoryUsedPercentBelow, cpuUsedPercentBelow, diskUsedPercentBelow or temperatureCelsiusBelow"),
            );
        }
        for (field, value, max) in thresholds {
            if let Some(value) = value {
                if !(value > 0.0 && value <= max) {
                    errors.push(
                        FieldError::new(
                            path.key("resource").key(field),
                            format!("{value} is out of range"),
                        )
                        .hint(format!("use a number above 0 and at most {max}")),
                    );
                }
            }
        }
    }
    for (field, value) in [
        ("periodSeconds", probe.period_seconds),
        ("failureThreshold", probe.failure_threshold),
        ("timeoutSeconds", probe.timeout_seconds),
    ] {
        if value == 0 {
            errors.push(
                FieldError::new(path.key(field), format!("`{field}` must be at least 1"))
                    .hint("leave it out to use the default"),
            );
        } else if field != "failureThreshold" && u64::from(value) > MAX_SECONDS {
            errors.push(too_long(path.key(field), field, u64::from(value)));
        } else if field == "failureThreshold" && value > MAX_FAILURE_THRESHOLD {
            errors.push(
                FieldError::new(
                    path.key(field),
                    format!("`{field}` {value} is more than {MAX_FAILURE_THRESHOLD}"),
                )
                .hint("a regression is a few failures in a row: use 1 to 100"),
            );
        }
    }
}

/// Checks a user or group name the way useradd and systemd's `User=` accept it: portable
/// characters, not starting with `-` (an option to every tool) nor a digit unless it is a
/// number (an id), at most 32 bytes.
pub fn account_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > 32 {
        return Err(format!("`{name}` is longer than 32 characters"));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return match name.parse::<u32>() {
            Ok(id) if id != u32::MAX => Ok(()),
            _ => Err(format!("`{name}` is not a valid id (0 to 4294967294)")),
        };
    }
    let first = name.as_bytes()[0];
    if first == b'-' || first.is_ascii_digit() {
        return Err(format!("`{name}` must not start with '-' or a digit"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("`{name}` contains {bad:?}"));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a name"));
    }
    Ok(())
}

/// The longest duration a manifest may name: 30 days. Longer is a typo (or an attempt to
/// overflow the controller's clock arithmetic), never a plan.
pub const MAX_SECONDS: u64 = 30 * 24 * 3600;

/// The most failures in a row a probe may wait for.
pub const MAX_FAILURE_THRESHOLD: u32 = 1000;

fn too_long(path: FieldPath, field: &str, value: u64) -> FieldError {
    FieldError::new(
        path,
        format!("`{field}` {value} is more than 30 days ({MAX_SECONDS} seconds)"),
    )
    .hint("use a number of seconds from 1 to 2592000")
}

fn check_budget(errors: &mut Vec<FieldError>, path: FieldPath, budget: FailureBudget) {
    if let FailureBudget::Percent(p) = budget {
        if p > 100 {
            errors.push(
                FieldError::new(path, format!("`{p}%` is more than 100%"))
                    .hint("use a node count (0) or a percentage from 0% to 100%"),
            );
        }
    }
}

fn check_rollout(errors: &mut Vec<FieldError>, path: &FieldPath, rollout: &RolloutSpec) {
    let waves = path.key("waves");
    match rollout.waves.last() {
        None => errors.push(
            FieldError::new(waves.clone(), "at least one wave is required")
                .hint("for example `waves: [\"1\", \"10%\", \"50%\", \"100%\"]`"),
        ),
        Some(WaveStep::Percent(100)) => {}
        Some(last) => errors.push(
            FieldError::new(
                waves.index(rollout.waves.len() - 1),
                format!("the last wave is `{last}`, but waves must end at \"100%\""),
            )
            .hint("add \"100%\" as the last wave"),
        ),
    }
    let out_of_range = |step: &WaveStep| match *step {
        WaveStep::Count(n) => n == 0,
        WaveStep::Percent(p) => p == 0 || p > 100,
    };
    for (i, step) in rollout.waves.iter().enumerate() {
        if out_of_range(step) {
            errors.push(
                FieldError::new(waves.index(i), format!("wave `{step}` is out of range"))
                    .hint("a wave is a node count of at least 1 or a percentage from 1% to 100%"),
            );
        }
    }
    check_budget(errors, path.key("maxFailures"), rollout.max_failures);
    check_budget(errors, path.key("maxUnavailable"), rollout.max_unavailable);
    for (field, value) in [
        ("bakeSeconds", rollout.bake_seconds),
        ("healthyDeadlineSeconds", rollout.healthy_deadline_seconds),
    ] {
        if value > MAX_SECONDS {
            errors.push(too_long(path.key(field), field, value));
        }
    }
    let mut last_count = 0;
    let mut last_percent = 0;
    for (i, step) in rollout.waves.iter().enumerate() {
        if out_of_range(step) {
            continue; // already reported; comparing it would only add noise
        }
        let (previous, value) = match *step {
            WaveStep::Count(n) => (&mut last_count, n),
            WaveStep::Percent(p) => (&mut last_percent, p),
        };
        if value <= *previous {
            errors.push(
                FieldError::new(
                    waves.index(i),
                    format!("wave `{step}` does not grow the rollout: waves are cumulative and must strictly increase"),
                )
                .hint("list cumulative sizes in increasing order, e.g. [\"1\", \"10%\", \"50%\", \"100%\"]"),
            );
        }
        *previous = value.max(*previous);
        if matches!(step, WaveStep::Count(_)) && last_percent > 0 {
            errors.push(
                FieldError::new(
                    waves.index(i),
                    format!("node count `{step}` after a percentage wave"),
                )
                .hint("put node counts (\"1\", \"5\") before percentages (\"10%\")"),
            );
        }
    }
    if rollout.healthy_deadline_seconds == 0 {
        errors.push(
            FieldError::new(
                path.key("healthyDeadlineSeconds"),
                "`healthyDeadlineSeconds` must be at least 1",
            )
            .hint("leave it out to use the default of 600"),
        );
    }
    if let Some(label) = &rollout.spread_by {
        if !is_label_key(label) {
            errors.push(
                FieldError::new(
                    path.key("spreadBy"),
                    format!("`{label}` is not a valid label key"),
                )
                .hint(LABEL_KEY_HINT),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_to_30_days_and_budgets_to_100_percent() {
        let text = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {role: web}}\n  components:\n    - {name: web, kind: service, version: 1.0.0, artifact: {url: 'http://h/w.tgz', sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}, service: {exec: [bin/w], startSeconds: 4000000000}}\n  probes: [{name: p, tcp: {address: '127.0.0.1:1'}, periodSeconds: 2592001, failureThreshold: 100000}]\n  rollout: {healthyDeadlineSeconds: 18446744073709551615, bakeSeconds: 2592000, maxUnavailable: '101%'}\n";
        let parsed = crate::parse_str("t.yaml", text);
        let errors: Vec<String> = parsed
            .diagnostics
            .iter()
            .map(|d| format!("{} {}", d.field, d.message))
            .collect();
        let all = errors.join("\n");
        for field in [
            "spec.rollout.healthyDeadlineSeconds",
            "spec.components[0].service.startSeconds",
            "spec.probes[0].periodSeconds",
            "spec.probes[0].failureThreshold",
            "spec.rollout.maxUnavailable",
        ] {
            assert!(all.contains(field), "{field} not refused:\n{all}");
        }
        assert!(
            !all.contains("bakeSeconds"),
            "30 days exactly is allowed:\n{all}"
        );
    }

    #[test]
    fn service_users_and_groups_are_names_or_ids() {
        for good in [
            "telemetry",
            "_apt",
            "systemd-network",
            "www-data",
            "a.b",
            "0",
            "65534",
            "Debian-exim",
        ] {
            assert_eq!(account_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-rf",
            "1abc",
            "has space",
            "semi;colon",
            "root:x",
            "..",
            "4294967295",
            "99999999999",
            "tele/metry",
            &"u".repeat(33),
        ] {
            assert!(account_name(bad).is_err(), "{bad:?} accepted");
        }
        let text = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {role: web}}\n  components:\n    - {name: web, kind: service, version: 1.0.0, artifact: {url: 'http://h/w.tgz', sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}, service: {exec: [bin/w], user: '-x', group: 'a b'}}\n";
        let parsed = crate::parse_str("t.yaml", text);
        let fields: Vec<String> = parsed
            .diagnostics
            .iter()
            .map(|d| d.field.to_string())
            .collect();
        assert_eq!(
            fields,
            [
                "spec.components[0].service.user",
                "spec.components[0].service.group"
            ]
        );
        let good = text
            .replace("'-x'", "telemetry")
            .replace("'a b'", "telemetry");
        assert!(crate::parse_str("t.yaml", &good).diagnostics.is_empty());
    }

    #[test]
    fn a_service_named_after_a_shoal_daemon_is_refused() {
        for (name, refused) in [
            ("nodelet", true),
            ("apiserver", true),
            ("nodelet-ui", false),
        ] {
            let text = format!("apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{role: web}}}}\n  components:\n    - {{name: {name}, kind: service, version: 1.0.0, artifact: {{url: 'http://h/w.tgz', sha256: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}}, service: {{exec: [bin/w]}}}}\n");
            let parsed = crate::parse_str("t.yaml", &text);
            let reserved = parsed
                .diagnostics
                .iter()
                .any(|d| d.field == "spec.components[0].name" && d.message.contains("reserved"));
            assert_eq!(reserved, refused, "{name}: {:?}", parsed.diagnostics);
        }
    }

    #[test]
    fn node_variables_are_checked_as_placeholders() {
        assert_eq!(
            without_node_vars("http://127.0.0.1:${PORT}/healthz"),
            "http://127.0.0.1:1/healthz"
        );
        assert_eq!(without_node_vars("${A}:${B}"), "1:1");
        assert_eq!(without_node_vars("no vars ${"), "no vars ${");
    }

    #[test]
    fn debian_versions() {
        for good in [
            "1.0",
            "2023.03-1",
            "1:2.4.1-0ubuntu1",
            "1.2~rc1",
            "0.9+dfsg-1.1",
            "1.2-3-4",
        ] {
            assert_eq!(check_debian_version(good), Ok(()), "{good}");
        }
        for bad in ["", "a1.0", "1.0-", "x:1.0", "1.0_1", "1.0-a_b", ":1.0"] {
            assert!(check_debian_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_labels() {
        assert!(is_dns_label("edge-gateways"));
        assert!(!is_dns_label("Edge"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_component_name("snd_hda_intel"));
        assert!(is_component_name("libstdc++6"));
        assert!(!is_component_name(".."));
        assert!(!is_component_name("a/b"));
        assert!(is_label_key("shoal/canary"));
        assert!(is_label_key("topology.kubernetes.io/zone"));
        assert!(!is_label_key("/x"));
        assert!(is_label_value(""));
        assert!(!is_label_value("a b"));
        assert_eq!(suggest_dns_label("Edge_Gateways"), "edge-gateways");
    }
}
