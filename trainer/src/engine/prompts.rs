//! Prompt templates of both roles. The text lives in `trainer/prompts/*.md`; this module only
//! fills the `{{name}}` placeholders and wraps turns in the model's chat markup.

use std::collections::BTreeMap;
use std::path::Path;

use selfplay_crds::run::PromptTemplates;
use thiserror::Error;

/// Where the artifact files of an injector go, relative to the workspace root. The directory
/// is not part of the repository: it is read after the episode and then removed by a reset.
pub const ARTIFACTS_DIR: &str = ".selfplay";

#[derive(Debug, Error)]
pub enum PromptError {
    #[error("prompt template {template}: no value for placeholder {{{{{name}}}}}")]
    MissingValue {
        template: &'static str,
        name: String,
    },
    #[error("prompt template {template}: unclosed placeholder")]
    Unclosed { template: &'static str },
    #[error("prompt template {template}: it must contain {{{{{name}}}}}, which carries {what}")]
    Required {
        template: &'static str,
        name: &'static str,
        what: &'static str,
    },
    #[error("reading prompt template {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The template files, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptSet {
    pub tools: String,
    pub injector: String,
    pub solver: String,
    /// The solver's task in held-out evaluation (an instance's problem statement).
    pub solver_issue: String,
    pub observation: String,
    pub format_error: String,
}

impl Default for PromptSet {
    /// The templates bundled with the binary.
    fn default() -> Self {
        Self {
            tools: include_str!("../../prompts/tools.md").to_string(),
            injector: include_str!("../../prompts/injector.md").to_string(),
            solver: include_str!("../../prompts/solver.md").to_string(),
            solver_issue: include_str!("../../prompts/solver_issue.md").to_string(),
            observation: include_str!("../../prompts/observation.md").to_string(),
            format_error: include_str!("../../prompts/format_error.md").to_string(),
        }
    }
}

impl PromptSet {
    /// Templates from a directory holding the same five files; missing files keep the
    /// bundled text.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let mut set = Self::default();
        let slots: [(&str, &mut String); 6] = [
            ("tools.md", &mut set.tools),
            ("injector.md", &mut set.injector),
            ("solver.md", &mut set.solver),
            ("solver_issue.md", &mut set.solver_issue),
            ("observation.md", &mut set.observation),
            ("format_error.md", &mut set.format_error),
        ];
        for (name, slot) in slots {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => *slot = text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PromptError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        set.check()?;
        Ok(set)
    }

    /// The bundled templates with a run's replacements (`spec.selfPlay.prompts`), checked.
    pub fn with_templates(templates: Option<&PromptTemplates>) -> Result<Self, PromptError> {
        let mut set = Self::default();
        let Some(t) = templates else {
            return Ok(set);
        };
        let slots: [(&Option<String>, &mut String); 6] = [
            (&t.tools, &mut set.tools),
            (&t.injector, &mut set.injector),
            (&t.solver, &mut set.solver),
            (&t.solver_issue, &mut set.solver_issue),
            (&t.observation, &mut set.observation),
            (&t.format_error, &mut set.format_error),
        ];
        for (given, slot) in slots {
            if let Some(text) = given {
                *slot = text.clone();
            }
        }
        set.check()?;
        Ok(set)
    }

    /// Every template renders with the values the engine fills in (an unknown placeholder
    /// would otherwise fail every episode), and holds the placeholder that carries what its
    /// reader needs: a solver that is not shown its task cannot learn, it can only guess.
    /// The CRD's CEL rules check the placeholders at admission too; this also covers
    /// templates read from a directory (`from_dir`), which no API server sees.
    pub fn check(&self) -> Result<(), PromptError> {
        let required: [(&'static str, &String, &'static str, &'static str); 5] = [
            (
                "injector",
                &self.injector,
                "artifacts_dir",
                "where the artifacts go",
            ),
            ("solver", &self.solver, "task_diff", "the solver's task"),
            (
                "solverIssue",
                &self.solver_issue,
                "problem_statement",
                "the task",
            ),
            (
                "observation",
                &self.observation,
                "output",
                "the tool's output",
            ),
            ("formatError", &self.format_error, "error", "what was wrong"),
        ];
        for (template, text, name, what) in required {
            if !text.contains(&format!("{{{{{name}}}}}")) {
                return Err(PromptError::Required {
                    template,
                    name,
                    what,
                });
            }
        }
        self.injector_task(&InjectorPromptValues {
            min_passing_tests: 1,
            min_failing_tests: 1,
            min_changed_files: 1,
        })?;
        self.solver_task("")?;
        self.solver_issue_task("")?;
        self.observation("", "")?;
        self.format_error("", "")?;
        Ok(())
    }

    /// The solver's task in held-out evaluation: an instance's problem statement.
    pub fn solver_issue_task(&self, problem_statement: &str) -> Result<String, PromptError> {
        render(
            "solverIssue",
            &self.solver_issue,
            &[
                ("tools", self.tools.trim_end().to_string()),
                (
                    "problem_statement",
                    problem_statement.trim_end().to_string(),
                ),
            ],
        )
    }

    /// The injector's task, with the thresholds its artifacts are checked against.
    pub fn injector_task(&self, limits: &InjectorPromptValues) -> Result<String, PromptError> {
        let tools = self.tools.trim_end().to_string();
        render(
            "injector.md",
            &self.injector,
            &[
                ("tools", tools),
                ("artifacts_dir", ARTIFACTS_DIR.to_string()),
                ("min_passing_tests", limits.min_passing_tests.to_string()),
                ("min_failing_tests", limits.min_failing_tests.to_string()),
                ("min_changed_files", limits.min_changed_files.to_string()),
            ],
        )
    }

    /// The solver's task: the reversed test weakening.
    pub fn solver_task(&self, task_diff: &str) -> Result<String, PromptError> {
        let tools = self.tools.trim_end().to_string();
        render(
            "solver.md",
            &self.solver,
            &[
                ("tools", tools),
                ("task_diff", task_diff.trim_end().to_string()),
            ],
        )
    }

    pub fn observation(&self, output: &str, budget: &str) -> Result<String, PromptError> {
        render(
            "observation.md",
            &self.observation,
            &[
                ("output", output.to_string()),
                ("budget", budget.to_string()),
            ],
        )
    }

    pub fn format_error(&self, error: &str, budget: &str) -> Result<String, PromptError> {
        render(
            "format_error.md",
            &self.format_error,
            &[("error", error.to_string()), ("budget", budget.to_string())],
        )
    }
}

/// Values the injector prompt names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectorPromptValues {
    pub min_passing_tests: usize,
    pub min_failing_tests: usize,
    pub min_changed_files: usize,
}

/// Fills `{{name}}` placeholders in one pass: values are never scanned for placeholders, so
/// a diff or tool output holding `{{x}}` survives unchanged.
pub fn render(
    template_name: &'static str,
    template: &str,
    values: &[(&str, String)],
) -> Result<String, PromptError> {
    let values: BTreeMap<&str, &str> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(PromptError::Unclosed {
                template: template_name,
            });
        };
        let name = after[..close].trim();
        let Some(value) = values.get(name) else {
            return Err(PromptError::MissingValue {
                template: template_name,
                name: name.to_string(),
            });
        };
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How turns are marked up for the model. The codec encodes the markup as text (the Hugging
/// Face codec maps special-token strings such as `<|im_start|>` to their ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMarkup {
    /// Before a system message (the engine writes none; conversations replayed by
    /// `trainer sft` may hold one). It ends with `user_end`.
    pub system_start: String,
    /// Before the task text (the first user message).
    pub user_start: String,
    /// After a user message and before the policy's turn.
    pub assistant_start: String,
    /// Between the end of the policy's turn and the next user message.
    pub assistant_end: String,
    /// After a user message.
    pub user_end: String,
}

impl ChatMarkup {
    /// No special tokens: turns are separated by newlines (the tiny byte-level model).
    pub fn plain() -> Self {
        Self {
            system_start: String::new(),
            user_start: String::new(),
            user_end: "\n".into(),
            assistant_start: String::new(),
            assistant_end: "\n".into(),
        }
    }

    /// ChatML, as Qwen2 models use it.
    pub fn chatml() -> Self {
        Self {
            system_start: "<|im_start|>system\n".into(),
            user_start: "<|im_start|>user\n".into(),
            user_end: "<|im_end|>\n".into(),
            assistant_start: "<|im_start|>assistant\n".into(),
            assistant_end: "<|im_end|>\n".into(),
        }
    }

    /// The episode's first context: the task as a user message, then the policy's turn.
    pub fn first_prompt(&self, task: &str) -> String {
        format!(
            "{}{}{}{}",
            self.user_start, task, self.user_end, self.assistant_start
        )
    }

    /// What follows a policy turn: the tool result as a user message, then the next turn.
    pub fn observation(&self, body: &str) -> String {
        format!(
            "{}{}{}{}{}",
            self.assistant_end, self.user_start, body, self.user_end, self.assistant_start
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_templates_render() {
        let p = PromptSet::default();
        let inj = p
            .injector_task(&InjectorPromptValues {
                min_passing_tests: 2,
                min_failing_tests: 1,
                min_changed_files: 1,
            })
            .unwrap();
        assert!(inj.contains(".selfplay/bug_inject.diff"));
        assert!(inj.contains("git log"));
        assert!(inj.contains("<submit/>"));
        let sol = p
            .solver_task("--- a/t.py\n+++ b/t.py\n{{not a placeholder}}")
            .unwrap();
        assert!(sol.contains("{{not a placeholder}}"));
        assert!(p.observation("out", "[budget]").unwrap().contains("out"));
        assert!(p.format_error("bad", "[budget]").unwrap().contains("bad"));
    }

    #[test]
    fn missing_values_are_errors() {
        assert!(matches!(
            render("t", "a {{x}} b", &[]),
            Err(PromptError::MissingValue { .. })
        ));
        assert!(matches!(
            render("t", "a {{x", &[]),
            Err(PromptError::Unclosed { .. })
        ));
        assert_eq!(
            render("t", "a {{ x }} b", &[("x", "1".into())]).unwrap(),
            "a 1 b"
        );
    }

    #[test]
    fn a_run_replaces_the_templates_it_names_and_keeps_the_rest() {
        let t = PromptTemplates {
            solver: Some("Fix: {{task_diff}}\n{{tools}}".into()),
            tools: Some("<bash>cmd</bash>".into()),
            ..Default::default()
        };
        let p = PromptSet::with_templates(Some(&t)).unwrap();
        assert_eq!(
            p.solver_task("+x = 1\n").unwrap(),
            "Fix: +x = 1\n<bash>cmd</bash>"
        );
        assert_eq!(p.injector, PromptSet::default().injector);
        assert!(
            p.solver_issue_task("broken")
                .unwrap()
                .contains("<bash>cmd</bash>"),
            "the run's tools reach the evaluation prompt too"
        );
        assert_eq!(
            PromptSet::with_templates(None).unwrap(),
            PromptSet::default()
        );
    }

    #[test]
    fn templates_that_hide_the_task_or_name_unknown_values_are_refused() {
        let blind = PromptTemplates {
            solver: Some("Fix the bug. {{tools}}".into()),
            ..Default::default()
        };
        let e = PromptSet::with_templates(Some(&blind)).unwrap_err();
        assert!(e.to_string().contains("{{task_diff}}"), "{e}");
        let unknown = PromptTemplates {
            observation: Some("{{output}} {{budget}} {{secret}}".into()),
            ..Default::default()
        };
        let e = PromptSet::with_templates(Some(&unknown)).unwrap_err();
        assert!(e.to_string().contains("{{secret}}"), "{e}");
        let unclosed = PromptTemplates {
            format_error: Some("{{error}} {{budget".into()),
            ..Default::default()
        };
        assert!(PromptSet::with_templates(Some(&unclosed)).is_err());
    }
}
