use flash_moe_engine::model::config::ModelConfig;
use flash_moe_engine::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory holding tokenizer.json.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Text to tokenize.
    #[arg(long)]
    text: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = ModelConfig::from_dir(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&args.model, &config.eos_token_ids)?;
    let ids = tokenizer.encode(&args.text)?;
    let text: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", text.join(","));
    Ok(())
}
