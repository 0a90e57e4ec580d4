//! Scenario 3, latency against offered load: each strategy at fixed rates
//! (10, 100, 1,000 msgs/s), then a search for the highest rate it sustains.

use crate::rig::{Rig, Strategy};
use crate::scenarios::{search_max, step};
use crate::{say, Bench};

/// Run it for the three strategies without added database latency.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    for strategy in Strategy::ALL {
        measure_strategy(bench, strategy, true).await?;
    }
    Ok(())
}

/// Fixed rates (when `fixed_rates`) and the search, for one strategy on a
/// fresh service without added database latency.
pub async fn measure_strategy(
    bench: &mut Bench,
    strategy: Strategy,
    fixed_rates: bool,
) -> anyhow::Result<()> {
    say(format!("latency: {} batching", strategy.name()));
    let mut rig = Rig::new(&bench.bin, strategy, false, &[]).await?;
    let outcome = async {
        rig.start().await?;
        if fixed_rates {
            let scale = bench.scale.clone();
            for &rate in &scale.latency_rates {
                let (point, _) = step(
                    &rig,
                    strategy,
                    0.0,
                    rate,
                    scale.latency_window / 5,
                    scale.latency_window - scale.latency_window / 5,
                    "fixed-rate",
                )
                .await?;
                bench.results.points.push(point);
            }
        }
        search_max(bench, &rig, strategy, 0.0).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    rig.finish().await;
    outcome
}
