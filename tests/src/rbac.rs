//! RBAC as sets of (API group, resource, verb) permissions: from rendered Roles and
//! ClusterRoles, and from the operator's own list (`operator/rbac.md`), so the two can be
//! compared exactly.

use std::collections::BTreeSet;

use serde_json::Value;

/// One permission: API group ("" for core), resource (with subresource, e.g. `pods/status`)
/// and verb.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    pub group: String,
    pub resource: String,
    pub verb: String,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{group} {} {}", self.resource, self.verb)
    }
}

/// The permissions granted by the `rules` of Role and ClusterRole objects (resourceNames
/// narrow a rule but do not change which calls it allows).
pub fn from_roles<'a>(roles: impl IntoIterator<Item = &'a Value>) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for role in roles {
        for rule in role["rules"].as_array().into_iter().flatten() {
            let strings = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for verb in strings("verbs") {
                        out.insert(Permission {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                        });
                    }
                }
            }
        }
    }
    out
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_start_matches('|')
        .trim_end_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

/// Words of a cell: split on commas, slashes-free whitespace and backquotes.
fn words(cell: &str) -> Vec<String> {
    cell.split([',', ' ', ';'])
        .map(|w| w.trim().trim_matches('`').trim_matches('"').trim())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn core_group(g: &str) -> String {
    match g.to_ascii_lowercase().as_str() {
        "" | "core" | "(core)" | "\"\"" | "v1" => String::new(),
        _ => g.to_string(),
    }
}

/// The permissions of the markdown tables of a document whose header row names an API
/// group column, a resource column and a verbs column (in any order, any other columns
/// ignored). Cells may list several comma-separated resources and verbs, in backquotes.
pub fn from_markdown(doc: &str) -> Result<BTreeSet<Permission>, String> {
    let mut out = BTreeSet::new();
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    let mut tables = 0;
    while i < lines.len() {
        let header = cells(lines[i]);
        let find =
            |pred: &dyn Fn(&str) -> bool| header.iter().position(|h| pred(&h.to_ascii_lowercase()));
        let is_table = lines[i].trim_start().starts_with('|')
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with('|') && l.contains("---"));
        let (Some(g), Some(r), Some(v)) = (
            find(&|h| h.contains("group")),
            find(&|h| h.contains("resource")),
            find(&|h| h.contains("verb")),
        ) else {
            i += 1;
            continue;
        };
        if !is_table {
            i += 1;
            continue;
        }
        tables += 1;
        i += 2;
        while i < lines.len() && lines[i].trim_start().starts_with('|') {
            let row = cells(lines[i]);
            let get = |k: usize| row.get(k).map(String::as_str).unwrap_or("");
            let groups: Vec<String> = {
                let w = words(get(g));
                if w.is_empty() {
                    vec![String::new()]
                } else {
                    w.iter().map(|x| core_group(x)).collect()
                }
            };
            for group in &groups {
                for resource in words(get(r)) {
                    for verb in words(get(v)) {
                        out.insert(Permission {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                        });
                    }
                }
            }
            i += 1;
        }
    }
    if tables == 0 {
        return Err("no table with group, resource and verb columns".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_tables_and_roles_agree() {
        let doc = "intro\n\n| API group | resource | verbs | why |\n| --- | --- | --- | --- |\n\
                   | `\"\"` (core) | `pods` | get, list | x |\n| `coordination.k8s.io` | `leases` | `create`, `update` | y |\n";
        let md = from_markdown(doc).unwrap();
        let role = serde_json::json!({"rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["l"], "verbs": ["create", "update"]}
        ]});
        assert_eq!(md, from_roles([&role]));
        assert_eq!(md.len(), 4);
    }
}
