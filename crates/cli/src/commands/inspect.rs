use flash_moe_engine::engine::inspect_model;
use flash_moe_engine::model::config::{FfnKind, LayerKind};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: std::path::PathBuf,
}

fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", units[unit])
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (c, layout, inv) = inspect_model(&args.model)?;
    let full = c.layers.iter().filter(|k| **k == LayerKind::FullAttention).count();
    let dense = c.ffn.iter().filter(|k| **k == FfnKind::Dense).count();
    let a = &c.attention;
    let l = &c.linear;
    let m = &c.moe;
    println!("model:      {} ({layout})", c.family.name());
    println!(
        "layers:     {} ({} linear attention, {full} full attention{})",
        c.num_layers(),
        c.num_layers() - full,
        if dense > 0 {
            format!(", {dense} with a dense MLP")
        } else {
            String::new()
        }
    );
    let pattern: String = c
        .layers
        .iter()
        .map(|k| if *k == LayerKind::FullAttention { 'F' } else { 'L' })
        .collect();
    println!("pattern:    {pattern}");
    println!("hidden:     {}, vocab {}", c.hidden_size, c.vocab_size);
    println!(
        "attention:  {} heads, {} kv heads, head dim {}, rotary dim {}, rope theta {}",
        a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim, a.rope_theta
    );
    println!(
        "linear:     {} key heads x {}, {} value heads x {}, conv kernel {}",
        l.num_key_heads, l.key_head_dim, l.num_value_heads, l.value_head_dim, l.conv_kernel
    );
    println!(
        "experts:    {} per layer, {} active, intermediate {}, shared expert {}",
        m.num_experts, m.experts_per_token, m.expert_intermediate, m.shared_intermediate
    );
    println!(
        "parameters: {} total, {} active per token",
        count(inv.total_parameters()),
        count(inv.active_parameters())
    );
    println!(
        "bytes:      {} dense (resident), {} routed experts",
        human_bytes(inv.dense_bytes()),
        human_bytes(inv.expert_bytes())
    );
    println!("by class:");
    for (class, totals) in &inv.classes {
        println!(
            "  {:<20} {:>10} params {:>12}  {}",
            class.label(),
            count(totals.parameters),
            human_bytes(totals.bytes),
            totals.encodings.join(", ")
        );
    }
    Ok(())
}
