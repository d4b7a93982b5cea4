use std::io::Write;

use anyhow::Context;

use std::sync::Arc;

use flash_moe_engine::backend::Backend;
use flash_moe_engine::engine::generate;
use flash_moe_engine::engine::sampler::{Sampler, SamplingParams};
use flash_moe_engine::model::Model;
use flash_moe_engine::storage::store::ExpertStore;
use flash_moe_engine::tokenizer::Tokenizer;

use super::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt, used as is (no chat template).
    #[arg(long, required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file (UTF-8, used as is; `-` reads standard input), for
    /// prompts too long for a command line.
    #[arg(long, value_name = "PATH")]
    prompt_file: Option<std::path::PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Subtracted once from the logit of every token generated so far (OpenAI's).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Logits of tokens in the prompt or the output divided by it when positive, multiplied
    /// when negative (transformers'; 1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print where the time went (per layer and phase), expert I/O and peak memory.
    #[arg(long)]
    timing: bool,
    /// Read every expert into the in-process cache and the GPU's expert cache before
    /// generating, as far as they hold (with --expert-cache-mib big enough: RAM-resident
    /// experts, no disk reads afterwards; with every expert in VRAM, routing on the GPU).
    #[arg(long)]
    prefetch_experts: bool,
    /// Generate this many tokens first, unmeasured and not printed, to warm the caches.
    #[arg(long, default_value_t = 0)]
    warmup_tokens: usize,
    /// Write the run's measurements (speeds, expert I/O per tier, phase times) as JSON.
    #[arg(long)]
    stats_json: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_args = args.model.clone();
    model_args.run(args)
}

impl super::ModelJob for Args {
    fn run<B: Backend>(self, model: Model<B>, store: Arc<ExpertStore>) -> anyhow::Result<()> {
        generate_text(&self, &model, &store)
    }
}

fn generate_text<B: Backend>(args: &Args, model: &Model<B>, store: &ExpertStore) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_dir(&args.model.model, &model.config.eos_token_ids)?;
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the prompt from standard input")?
        }
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading the prompt from {}", path.display()))?
        }
        (None, None) => anyhow::bail!("give --prompt or --prompt-file"),
    };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() + args.max_tokens > context {
        eprintln!(
            "warning: the prompt ({} tokens) and up to {} more go past the model's context of {context} tokens; \
             positions past it are not what the model was trained on",
            prompt.len(),
            args.max_tokens
        );
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        seed: args.seed,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
    };
    // A sampler per run: the warm-up's tokens are not the measured run's output, which its
    // penalties count.
    let sampler = || {
        let mut s = Sampler::new(params.clone());
        s.set_prompt(&prompt);
        s
    };
    let io = Some(store.stats());
    if args.prefetch_experts {
        model.prefetch_experts()?;
    }
    if args.warmup_tokens > 0 {
        generate(
            model,
            &tokenizer,
            &prompt,
            args.warmup_tokens,
            &mut sampler(),
            io,
            |_: &str| {},
        )?;
    }
    let mut stdout = std::io::stdout().lock();
    let stats = generate(
        model,
        &tokenizer,
        &prompt,
        args.max_tokens,
        &mut sampler(),
        io,
        |text: &str| {
            // A closed pipe (e.g. `| head`) ends output, not the run.
            let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
        },
    )?;
    let _ = writeln!(stdout);
    eprintln!(
        "prompt: {} tokens, {:.2} tok/s | decode: {} tokens, {:.2} tok/s | backend: {}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second(),
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        model.backend().describe(),
    );
    if let Some(path) = &args.stats_json {
        let mut json = super::timing::json(&stats);
        json["cpu_expert_share"] = model.cpu_expert_share().into();
        std::fs::write(path, json.to_string()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if args.timing {
        eprint!("{}", super::timing::report(&model.config, &stats));
        eprintln!(
            "share of missed experts computed on the CPU: {:.2}",
            model.cpu_expert_share()
        );
    }
    Ok(())
}
