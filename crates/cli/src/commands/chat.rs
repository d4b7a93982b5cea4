//! `flash-moe chat`: an interactive conversation in the terminal, with line editing and
//! history, streamed answers, thinking shown dimmed, and an opt-in bash tool that asks
//! before it runs anything. Each turn starts from the snapshot of the conversation so far.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use flash_moe_engine::backend::Backend;
use flash_moe_engine::chat::{ChatEvent, ChatTemplate, Message, OutputParser, ToolCall, ToolChoice, build_prompt};
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::{FinishReason, GenerationRequest, Session, TextSink};
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::store::ExpertStore;
use flash_moe_engine::tokenizer::Tokenizer;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ModelArgs;

/// Tools the model may be given.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// Run a bash command (each one is shown and must be confirmed).
    Bash,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Do not print the model's thinking.
    #[arg(long)]
    hide_thinking: bool,
    /// Ask the model not to think (templates with a thinking switch).
    #[arg(long)]
    no_think: bool,
    /// Tools the model may call (repeatable).
    #[arg(long = "tool", value_enum)]
    tools: Vec<ToolKind>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Sampling temperature (default: the model's generation_config.json, else 0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest conversation in tokens (default: the model's context).
    #[arg(long)]
    max_context: Option<usize>,
    /// Memory for conversation snapshots, in MiB.
    #[arg(long, default_value_t = 2048)]
    prefix_cache_mib: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for Args {
    fn max_context(&self) -> Option<usize> {
        self.max_context
    }

    fn run<B: Backend>(self, model: Model<B>, _store: Arc<ExpertStore>) -> anyhow::Result<()> {
        let dir = &self.model.model;
        let tokenizer = Tokenizer::from_dir(dir, &model.config.eos_token_ids)?;
        let template = ChatTemplate::from_dir(dir)?;
        if template.is_fallback() {
            eprintln!("note: {} has no chat template; using ChatML", dir.display());
        }
        let mut sampling = SamplingParams::from_generation_config(dir, SamplingParams::default())?;
        sampling.seed = self.seed;
        sampling.temperature = self.temperature.unwrap_or(sampling.temperature);
        sampling.top_p = self.top_p.unwrap_or(sampling.top_p);
        sampling.top_k = self.top_k.unwrap_or(sampling.top_k);
        sampling.min_p = self.min_p.unwrap_or(sampling.min_p);
        sampling.repetition_penalty = self.repetition_penalty.unwrap_or(sampling.repetition_penalty);
        let max_context = self.max_context.unwrap_or(model.config.max_position_embeddings);
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&interrupted);
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
        let mut chat = Chat {
            model: &model,
            tokenizer: &tokenizer,
            template: &template,
            session: Session::new(max_context, self.prefix_cache_mib << 20),
            conversation: Conversation {
                system: self.system.clone(),
                messages: Vec::new(),
            },
            tools: self.tools.clone(),
            sampling,
            max_tokens: self.max_tokens,
            enable_thinking: self.no_think.then_some(false),
            hide_thinking: self.hide_thinking,
            color: std::io::stdout().is_terminal(),
            interrupted,
        };
        chat.repl()
    }
}

/// What `/save` writes and `/load` reads.
#[derive(Serialize, Deserialize)]
struct Conversation {
    system: Option<String>,
    messages: Vec<Message>,
}

impl Conversation {
    fn all(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::text("system", s.clone()));
        system.chain(self.messages.iter().cloned()).collect()
    }
}

struct Chat<'a, B: Backend> {
    model: &'a Model<B>,
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    session: Session<B>,
    conversation: Conversation,
    tools: Vec<ToolKind>,
    sampling: SamplingParams,
    max_tokens: usize,
    enable_thinking: Option<bool>,
    hide_thinking: bool,
    color: bool,
    interrupted: Arc<AtomicBool>,
}

const HELP: &str = "/clear  forget the conversation\n/system TEXT  set the system prompt (empty: none)\n\
/save FILE  write the conversation as JSON\n/load FILE  read one back\n/quit  leave (or Ctrl-D)\n\
Ctrl-C stops the current answer.";

impl<B: Backend> Chat<'_, B> {
    fn repl(&mut self) -> anyhow::Result<()> {
        let mut editor = DefaultEditor::new().context("opening the terminal")?;
        let history = history_path();
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        if std::io::stdin().is_terminal() {
            eprintln!("flash-moe chat: /help for commands, Ctrl-D to leave");
        }
        loop {
            let line = match editor.readline(">>> ") {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e).context("reading input"),
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let _ = editor.add_history_entry(line);
            if let Some(command) = line.strip_prefix('/') {
                if !self.command(command)? {
                    break;
                }
                continue;
            }
            self.conversation.messages.push(Message::text("user", line));
            self.answer(&mut editor)?;
        }
        if let Some(path) = &history {
            let _ = editor.save_history(path);
        }
        Ok(())
    }

    /// Runs a slash command; false means leave.
    fn command(&mut self, command: &str) -> anyhow::Result<bool> {
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        let rest = rest.trim();
        match name {
            "quit" | "exit" => return Ok(false),
            "help" => println!("{HELP}"),
            "clear" => {
                self.conversation.messages.clear();
                println!("(conversation cleared)");
            }
            "system" => {
                self.conversation.system = (!rest.is_empty()).then(|| rest.to_string());
                println!("(system prompt {})", if rest.is_empty() { "removed" } else { "set" });
            }
            "save" if !rest.is_empty() => {
                let text = serde_json::to_string_pretty(&self.conversation)?;
                std::fs::write(rest, text).with_context(|| format!("writing {rest}"))?;
                println!("(saved {} messages to {rest})", self.conversation.messages.len());
            }
            "load" if !rest.is_empty() => match load(Path::new(rest)) {
                Ok(conversation) => {
                    self.conversation = conversation;
                    println!("(loaded {} messages from {rest})", self.conversation.messages.len());
                }
                Err(e) => eprintln!("error: {e:#}"),
            },
            _ => eprintln!("unknown command /{command}\n{HELP}"),
        }
        Ok(true)
    }

    /// Answers the conversation, running tool calls (when confirmed) until the model replies
    /// without one.
    fn answer(&mut self, editor: &mut DefaultEditor) -> anyhow::Result<()> {
        let tools: Vec<Value> = self.tools.iter().map(|t| tool_definition(*t)).collect();
        loop {
            let built = build_prompt(
                self.template,
                self.tokenizer,
                &self.conversation.all(),
                &tools,
                &ToolChoice::Auto,
                self.enable_thinking,
            )?;
            if built.prompt.len() >= self.session.max_context() {
                eprintln!(
                    "error: the conversation has {} tokens, more than the context of {}; /clear to start over",
                    built.prompt.len(),
                    self.session.max_context()
                );
                self.conversation.messages.pop();
                return Ok(());
            }
            let request = GenerationRequest {
                prompt: built.prompt,
                checkpoints: built.checkpoints,
                max_tokens: self.max_tokens,
                sampling: self.sampling.clone(),
                stop: Vec::new(),
                logprobs: None,
                prompt_logprobs: None,
            };
            self.interrupted.store(false, Ordering::SeqCst);
            let mut printer = Printer::new(built.parser, self.hide_thinking, self.color, &self.interrupted);
            let done = self
                .session
                .generate(self.model, self.tokenizer, &request, &mut printer)?;
            let reply = printer.finish();
            let calls = reply.tool_calls.clone();
            self.conversation.messages.push(reply);
            let rate = done.completion_tokens.saturating_sub(1) as f64 / done.decode_time.as_secs_f64().max(1e-9);
            eprintln!(
                "{}({} tokens, {rate:.1} tok/s; prompt {} tokens, {} reused){}",
                self.dim(),
                done.completion_tokens,
                done.prompt_tokens,
                done.cached_tokens,
                self.reset()
            );
            if done.finish == FinishReason::Cancelled {
                println!("(stopped)");
                return Ok(());
            }
            if calls.is_empty() {
                return Ok(());
            }
            for call in &calls {
                let result = self.run_tool(call, editor)?;
                self.conversation.messages.push(Message {
                    tool_call_id: Some(call.id.clone()),
                    name: Some(call.name.clone()),
                    ..Message::text("tool", result)
                });
            }
        }
    }

    /// Shows a call, asks, and runs it; the text returned goes back to the model.
    fn run_tool(&self, call: &ToolCall, editor: &mut DefaultEditor) -> anyhow::Result<String> {
        let command = call.arguments.get("command").and_then(Value::as_str);
        let (true, Some(command)) = (call.name == "bash" && self.tools.contains(&ToolKind::Bash), command) else {
            println!(
                "[the model called `{}` with {}; no such tool]",
                call.name, call.arguments
            );
            return Ok(format!("error: there is no tool `{}` with these arguments", call.name));
        };
        println!("[bash] {command}");
        let confirmed = match editor.readline("run it? [y/N] ") {
            Ok(answer) => matches!(answer.trim(), "y" | "Y" | "yes"),
            Err(_) => false,
        };
        if !confirmed {
            return Ok("the user declined to run this command".to_string());
        }
        let result = run_bash(command);
        println!("{}{result}{}", self.dim(), self.reset());
        Ok(result)
    }

    fn dim(&self) -> &'static str {
        if self.color { "\x1b[2m" } else { "" }
    }

    fn reset(&self) -> &'static str {
        if self.color { "\x1b[0m" } else { "" }
    }
}

/// Output kept from a command, so one noisy command cannot flood the context.
const TOOL_OUTPUT_LIMIT: usize = 16 * 1024;

/// Runs `command` with `bash -c`, returning its exit status and output (truncated).
fn run_bash(command: &str) -> String {
    let output = match std::process::Command::new("bash").arg("-c").arg(command).output() {
        Ok(o) => o,
        Err(e) => return format!("error: could not run bash: {e}"),
    };
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if text.len() > TOOL_OUTPUT_LIMIT {
        let mut cut = TOOL_OUTPUT_LIMIT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[output truncated]");
    }
    format!(
        "exit status: {}\n{text}",
        output.status.code().map_or("killed".to_string(), |c| c.to_string())
    )
}

fn tool_definition(kind: ToolKind) -> Value {
    match kind {
        ToolKind::Bash => json!({"type": "function", "function": {
            "name": "bash",
            "description": "Run a bash command on the user's machine and return its exit status and output.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "description": "The command line to run."}},
                "required": ["command"]}}}),
    }
}

fn load(path: &Path) -> anyhow::Result<Conversation> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a saved conversation", path.display()))
}

fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".flash_moe_history"))
}

/// Prints an answer as it streams and keeps what it was made of.
struct Printer<'a> {
    parser: OutputParser,
    hide_thinking: bool,
    color: bool,
    in_reasoning: bool,
    reply: Message,
    interrupted: &'a AtomicBool,
}

impl<'a> Printer<'a> {
    fn new(parser: OutputParser, hide_thinking: bool, color: bool, interrupted: &'a AtomicBool) -> Self {
        Printer {
            parser,
            hide_thinking,
            color,
            in_reasoning: false,
            reply: Message::text("assistant", ""),
            interrupted,
        }
    }

    fn show(&mut self, events: Vec<ChatEvent>) {
        let mut out = std::io::stdout().lock();
        for event in events {
            match event {
                ChatEvent::Reasoning(text) => {
                    if !self.hide_thinking {
                        if !self.in_reasoning && self.color {
                            let _ = write!(out, "\x1b[2m");
                        }
                        let _ = write!(out, "{text}");
                    }
                    self.in_reasoning = true;
                    self.reply.reasoning_content.get_or_insert_default().push_str(&text);
                }
                ChatEvent::Content(text) => {
                    self.end_reasoning(&mut out);
                    let _ = write!(out, "{text}");
                    self.reply.content.push_str(&text);
                }
                ChatEvent::ToolCall(call) => {
                    self.end_reasoning(&mut out);
                    self.reply.tool_calls.push(call);
                }
            }
        }
        let _ = out.flush();
    }

    fn end_reasoning(&mut self, out: &mut impl Write) {
        if self.in_reasoning {
            if !self.hide_thinking {
                let _ = write!(out, "{}\n\n", if self.color { "\x1b[0m" } else { "" });
            }
            self.in_reasoning = false;
        }
    }

    fn finish(mut self) -> Message {
        let events = self.parser.finish();
        self.show(events);
        let mut out = std::io::stdout();
        self.end_reasoning(&mut out);
        let _ = writeln!(out);
        self.reply
    }
}

impl TextSink for Printer<'_> {
    fn text(&mut self, piece: &str) -> bool {
        let events = self.parser.push(piece);
        self.show(events);
        !self.interrupted.load(Ordering::SeqCst)
    }

    fn cancelled(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_output_and_status_come_back() {
        let out = run_bash("echo hi; echo err >&2; exit 3");
        assert_eq!(out, "exit status: 3\nhi\nerr\n");
    }
}
