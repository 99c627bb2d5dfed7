//! The pure part of reconciling: from what is desired and what is installed, the steps to take.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use manifests::{Component, ComponentKind, ComponentState};

use crate::journal::Action;

/// Fills in node variables (`${NAME}`, from `nodelet --var NAME=VALUE`, plus `${NODE_NAME}`)
/// in what a spec runs and probes: service arguments and environment, probe URLs, addresses
/// and commands. Several nodes on one host can then run the same manifest on their own ports,
/// as Nomad's `${NOMAD_PORT_…}` allows. Unknown variables are left as written.
pub fn interpolate(spec: &mut manifests::DesiredStateSpec, vars: &BTreeMap<String, String>) {
    let fill = |text: &mut String| {
        for (name, value) in vars {
            let pattern = format!("${{{name}}}");
            if text.contains(&pattern) {
                *text = text.replace(&pattern, value);
            }
        }
    };
    for component in &mut spec.components {
        if let Some(service) = component.service.as_mut() {
            service.exec.iter_mut().for_each(fill);
            service.env.values_mut().for_each(fill);
        }
    }
    for probe in &mut spec.probes {
        if let Some(http) = probe.http.as_mut() {
            fill(&mut http.url);
        }
        if let Some(tcp) = probe.tcp.as_mut() {
            fill(&mut tcp.address);
        }
        if let Some(exec) = probe.exec.as_mut() {
            exec.command.iter_mut().for_each(fill);
        }
    }
}

/// Compares two versions the way the component's kind orders them: semver for
/// services and drivers, dpkg's rules for packages. `None` when unparsable.
pub fn compare(kind: ComponentKind, a: &str, b: &str) -> Option<Ordering> {
    match kind {
        ComponentKind::Package => {
            let a: debversion::Version = a.parse().ok()?;
            let b: debversion::Version = b.parse().ok()?;
            Some(a.cmp(&b))
        }
        ComponentKind::Service | ComponentKind::Driver => {
            let a = semver::Version::parse(a).ok()?;
            let b = semver::Version::parse(b).ok()?;
            Some(a.cmp(&b))
        }
    }
}

/// What one component needs, given its installed version.
pub fn action(component: &Component, installed: Option<&str>) -> Option<Action> {
    match (component.state, installed, component.version.as_deref()) {
        (ComponentState::Absent, None, _) => None,
        (ComponentState::Absent, Some(_), _) => Some(Action::Remove),
        (ComponentState::Present, None, _) => Some(Action::Install),
        (ComponentState::Present, Some(_), None) => None,
        (ComponentState::Present, Some(have), Some(want)) if have == want => None,
        (ComponentState::Present, Some(have), Some(want)) => {
            Some(match compare(component.kind, want, have) {
                Some(Ordering::Greater) => Action::Upgrade,
                Some(Ordering::Less) => Action::Downgrade,
                // Equal by ordering but not byte-equal (e.g. "1.0" vs "1.0-0"), or unparsable: reinstall.
                _ => Action::Repair,
            })
        }
    }
}

/// The steps to bring `desired` (in manifest order) to its versions, given what is installed.
pub fn steps(
    desired: &[Component],
    installed: &BTreeMap<String, Option<String>>,
) -> Vec<(Component, Action)> {
    desired
        .iter()
        .filter_map(|component| {
            let have = installed.get(&component.name).and_then(|v| v.as_deref());
            action(component, have).map(|a| (component.clone(), a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(
        name: &str,
        kind: ComponentKind,
        version: Option<&str>,
        state: ComponentState,
    ) -> Component {
        Component {
            name: name.into(),
            kind,
            version: version.map(str::to_string),
            state,
            artifact: None,
            service: None,
            driver: None,
            package: None,
        }
    }

    #[test]
    fn decides_each_action() {
        let present = ComponentState::Present;
        let svc = component("svc", ComponentKind::Service, Some("1.2.0"), present);
        assert_eq!(action(&svc, None), Some(Action::Install));
        assert_eq!(action(&svc, Some("1.2.0")), None);
        assert_eq!(action(&svc, Some("1.10.0")), Some(Action::Downgrade));
        assert_eq!(action(&svc, Some("1.1.9")), Some(Action::Upgrade));
        let pkg = component("pkg", ComponentKind::Package, Some("1:1.0-1"), present);
        assert_eq!(
            action(&pkg, Some("2.0-1")),
            Some(Action::Upgrade),
            "an epoch wins"
        );
        let pkg = component("pkg", ComponentKind::Package, Some("1.0~rc1-1"), present);
        assert_eq!(
            action(&pkg, Some("1.0-1")),
            Some(Action::Downgrade),
            "~ sorts before release"
        );
        let gone = component("old", ComponentKind::Package, None, ComponentState::Absent);
        assert_eq!(action(&gone, Some("1.0")), Some(Action::Remove));
        assert_eq!(action(&gone, None), None);
    }

    #[test]
    fn fills_node_variables() {
        let text = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: x}\nspec:\n  components: [{name: s, kind: service, version: 1.0.0, artifact: {url: 'http://a.b/c', sha256: '0000000000000000000000000000000000000000000000000000000000000000'}, service: {exec: [bin/s, --listen, '127.0.0.1:${PORT}'], env: {WHO: '${NODE_NAME}'}}}]\n  probes: [{name: h, http: {url: 'http://127.0.0.1:${PORT}/healthz'}}, {name: t, tcp: {address: '127.0.0.1:${PORT}'}}]\n";
        let loaded = manifests::parse_str("t", text);
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
        let mut spec = loaded.objects[0].object.spec.clone();
        let vars = BTreeMap::from([
            ("PORT".to_string(), "18081".to_string()),
            ("NODE_NAME".to_string(), "n1".to_string()),
        ]);
        interpolate(&mut spec, &vars);
        let service = spec.components[0].service.as_ref().unwrap();
        assert_eq!(service.exec[2], "127.0.0.1:18081");
        assert_eq!(service.env["WHO"], "n1");
        assert_eq!(
            spec.probes[0].http.as_ref().unwrap().url,
            "http://127.0.0.1:18081/healthz"
        );
        assert_eq!(
            spec.probes[1].tcp.as_ref().unwrap().address,
            "127.0.0.1:18081"
        );
    }

    #[test]
    fn keeps_manifest_order_and_skips_converged() {
        let present = ComponentState::Present;
        let desired = vec![
            component("c", ComponentKind::Service, Some("1.0.0"), present),
            component("a", ComponentKind::Package, Some("2.0"), present),
            component("b", ComponentKind::Package, Some("1.0"), present),
        ];
        let installed = BTreeMap::from([
            ("c".to_string(), Some("0.9.0".to_string())),
            ("a".to_string(), Some("2.0".to_string())),
        ]);
        let plan: Vec<(String, Action)> = steps(&desired, &installed)
            .into_iter()
            .map(|(c, a)| (c.name, a))
            .collect();
        assert_eq!(
            plan,
            vec![
                ("c".to_string(), Action::Upgrade),
                ("b".to_string(), Action::Install)
            ]
        );
    }
}
