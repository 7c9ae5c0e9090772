//! Issue 18, "Size": a StintQuota at the schema's maxima (1000 members,
//! every string at its longest, a full history) with five gateway replicas
//! each holding a slice of every member is written to a real API server and
//! read back whole: the status, and one slice Lease per replica.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use copyhold::commons::ledger_leases::{ReplicaSlices, own_slices};
use copyhold::commons::maxima::{
    MAX_HISTORY, MAX_MEMBERS, register_at_maxima, replica_names, spec_at_maxima, stored,
};
use copyhold::gateway::slice_leases::{self, Wrote};
use copyhold::resources::stint_quota::StintQuota;
use copyhold_e2e::{TestNamespace, client, install_crds};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

#[tokio::test]
async fn a_register_at_the_schemas_maxima_with_five_replicas_is_written_and_read_back() -> Result<()>
{
    install_crds().await?;
    let ns = TestNamespace::create("sq-size")?;
    let client = client().await?;
    let spec = spec_at_maxima();
    let replicas = replica_names(5);
    let register = register_at_maxima(&spec, &replicas);
    let mut q = stored(&spec, &register);
    let name = q.metadata.name.clone().context("name")?;
    q.metadata.namespace = Some(ns.name.clone());
    q.metadata.uid = None;
    q.metadata.resource_version = None;
    q.metadata.generation = None;
    q.status = None;
    let quotas: Api<StintQuota> = Api::namespaced(client.clone(), &ns.name);
    let t0 = Instant::now();
    let mut created = quotas.create(&PostParams::default(), &q).await?;
    created.status = Some(register.clone());
    let written = quotas
        .replace_status(&name, &PostParams::default(), &created)
        .await
        .context("the API server refused the register")?;
    let status_write = t0.elapsed();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    for r in &replicas {
        let held = ReplicaSlices {
            replica: r.clone(),
            beats: 1,
            slices: own_slices(&register, r),
        };
        ensure!(
            matches!(
                slice_leases::write(&leases, &written, &held, None).await?,
                Wrote::Ok(_)
            ),
            "{r}: Lease not written"
        );
    }
    let back = slice_leases::register(&client, &ns.name, &name).await?;
    println!(
        "1000 members, 5 replicas: StintQuota created and its status written in {status_write:?}; \
         read back {} members, {} slices, {} replicas",
        back.members.len(),
        back.slices.len(),
        back.gateways.len()
    );
    ensure!(back.members.len() == MAX_MEMBERS);
    ensure!(
        back.slices.len() == 5 * MAX_MEMBERS,
        "{}",
        back.slices.len()
    );
    ensure!(back.gateways.len() == 5);
    ensure!(
        back.members
            .iter()
            .zip(&register.members)
            .all(|(b, w)| b.history.len() == MAX_HISTORY as usize && b.history == w.history),
        "history read back with its periods"
    );
    Ok(())
}
