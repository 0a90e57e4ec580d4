//! Scenario 4, a slow database: the service reaches PostgreSQL through a
//! proxy that adds a fixed delay to every round trip (a remote database).
//! Highest sustained rate and its median latency per strategy, and the batch
//! sizes `adaptive` chose.

use crate::rig::{Rig, Strategy};
use crate::scenarios::latency::measure_strategy;
use crate::scenarios::search_max;
use crate::{say, Bench};

/// Run it for the three strategies (and `adaptive` without added latency
/// first, if this run has not measured it yet: it is the baseline).
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let has_baseline = bench
        .results
        .max_rates
        .iter()
        .any(|m| m.strategy == Strategy::Adaptive && m.db_rtt_ms == 0.0);
    if !has_baseline {
        say("slowdb: baseline first (adaptive, no added latency)");
        measure_strategy(bench, Strategy::Adaptive, false).await?;
    }
    let rtt = bench.scale.slow_db_rtt;
    let rtt_ms = rtt.as_secs_f64() * 1000.0;
    for strategy in Strategy::ALL {
        say(format!(
            "slowdb: {} batching, +{rtt_ms:.0} ms per database round trip",
            strategy.name()
        ));
        let mut rig = Rig::new(&bench.bin, strategy, true, &[]).await?;
        let outcome = async {
            rig.start().await?;
            // The proxy delays each direction by half the round trip.
            if let Some(proxy) = &rig.proxy {
                proxy.set_latency(rtt / 2);
            }
            search_max(bench, &rig, strategy, rtt_ms).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        rig.finish().await;
        outcome?;
    }
    Ok(())
}
