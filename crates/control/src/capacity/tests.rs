use super::*;

/// A service under synthetic load: instances, rps, app and sidecar cores, p99 (ms).
fn load(instances: usize, rps: f64, app: f64, sidecar: f64, p99: f64) -> Load {
    Load {
        instances,
        requests: (rps * 60.0) as u64,
        rps,
        p99_ms: Some(p99),
        app_cores: Some(app),
        sidecar_cores: Some(sidecar),
        apps_measured: instances,
        reported_cores_per_instance: Some(2),
        ..Load::default()
    }
}

fn objective(ms: u64, target: f64) -> Objective {
    Objective {
        latency_objective: Duration::from_millis(ms),
        target_utilization: target,
        cores_per_instance: None,
    }
}

/// For CPU, for latency, recommended.
type Want = (Option<u64>, Option<u64>, u64);

#[test]
fn recommendations_on_synthetic_load() {
    let o = objective(200, 0.6);
    // (case, load, objective, want: for cpu, for latency, recommended)
    let cases: Vec<(&str, Load, Objective, Want)> = vec![
        (
            "over-provisioned: 1.2 cores / (2 × 0.6) = 1",
            load(4, 100.0, 1.0, 0.2, 50.0),
            o.clone(),
            (Some(1), None, 1),
        ),
        (
            "cpu-bound: 3 cores / 1.2 = 2.5 → 3",
            load(2, 1000.0, 2.5, 0.5, 80.0),
            o.clone(),
            (Some(3), None, 3),
        ),
        (
            "exactly three instances' worth is 3, not 4 (0.1 + 0.2 is 0.30000000000000004)",
            load(2, 100.0, 0.1, 0.2, 80.0),
            Objective {
                cores_per_instance: Some(1.0),
                target_utilization: 0.1,
                ..o.clone()
            },
            (Some(3), None, 3),
        ),
        (
            "latency breach: p99 300 > 200, 2 × 1.5 = 3",
            load(2, 100.0, 0.5, 0.1, 300.0),
            o.clone(),
            (Some(1), Some(3), 3),
        ),
        (
            "a large breach raises at most twofold: 3 × min(5, 2) = 6",
            load(3, 100.0, 0.5, 0.1, 1000.0),
            o.clone(),
            (Some(1), Some(6), 6),
        ),
        (
            "a slight breach still adds one: 4 × 1.05 = 4.2 → 5",
            load(4, 100.0, 0.5, 0.1, 210.0),
            o.clone(),
            (Some(1), Some(5), 5),
        ),
        (
            "cpu beats latency when it asks for more: 6 cores / 1.2 = 5 vs 2 × 1.25 → 3",
            load(2, 500.0, 5.0, 1.0, 250.0),
            o.clone(),
            (Some(5), Some(3), 5),
        ),
        (
            "a tighter objective turns the same load into a breach",
            load(2, 100.0, 0.5, 0.1, 150.0),
            objective(100, 0.6),
            (Some(1), Some(3), 3),
        ),
        (
            "a lower target utilization needs more: 3 cores / (2 × 0.3) = 5",
            load(2, 1000.0, 2.5, 0.5, 80.0),
            objective(200, 0.3),
            (Some(5), None, 5),
        ),
        (
            "given cores per instance win over the reported: 3 / (4 × 0.6) = 1.25 → 2",
            load(2, 1000.0, 2.5, 0.5, 80.0),
            Objective {
                cores_per_instance: Some(4.0),
                ..o.clone()
            },
            (Some(2), None, 2),
        ),
        (
            "idle: never below one",
            load(3, 0.0, 0.001, 0.001, 0.0),
            o.clone(),
            (Some(1), None, 1),
        ),
    ];
    for (name, l, o, (cpu, latency, want)) in cases {
        let r = recommend(&l, &o);
        assert_eq!(
            (
                r.instances_for_cpu,
                r.instances_for_latency,
                r.recommended_instances
            ),
            (cpu, latency, want),
            "{name}: {}",
            r.arithmetic
        );
        assert!(
            r.arithmetic
                .ends_with(&format!("recommended {want} (now {})", l.instances)),
            "{name}: {}",
            r.arithmetic
        );
    }
}

#[test]
fn the_arithmetic_shows_its_numbers() {
    let r = recommend(&load(2, 1000.0, 2.5, 0.5, 80.0), &objective(200, 0.6));
    assert_eq!(r.utilization, Some(0.75));
    assert!((r.cpu_ms_per_request.unwrap() - 3.0).abs() < 1e-9);
    assert!(
        r.arithmetic.contains(
            "cpu: 3.000 cores (2.500 app + 0.500 sidecar) / 1000.0 rps = 3.000 ms per request; 3.000 ms × 1000.0 rps / (2 cores × 0.6 target) = 2.50 → 3"
        ),
        "{}",
        r.arithmetic
    );
    assert!(r.arithmetic.contains("p99 80.0 ms ≤ objective 200 ms"));
}

#[test]
fn without_data_it_keeps_the_count_and_says_why() {
    let few = Load {
        instances: 3,
        requests: 20,
        rps: 0.3,
        p99_ms: Some(900.0),
        ..Load::default()
    };
    let r = recommend(&few, &Objective::default());
    assert_eq!(
        (
            r.instances_for_cpu,
            r.instances_for_latency,
            r.recommended_instances
        ),
        (None, None, 3)
    );
    assert!(
        r.arithmetic.contains("no usage samples yet"),
        "{}",
        r.arithmetic
    );
    assert!(r.arithmetic.contains("too few"), "{}", r.arithmetic);
    // Sidecar CPU alone: a floor, said so.
    let sidecar_only = Load {
        app_cores: None,
        apps_measured: 0,
        ..load(2, 100.0, 0.0, 0.3, 50.0)
    };
    let r = recommend(&sidecar_only, &Objective::default());
    assert_eq!(r.recommended_instances, 1);
    assert!(
        r.arithmetic.contains("app CPU not measured"),
        "{}",
        r.arithmetic
    );
}

#[test]
fn objectives_are_checked() {
    assert!(Objective::default().check().is_ok());
    for (o, want) in [
        (objective(0, 0.6), "latencyObjectiveMs"),
        (objective(200, 0.0), "targetUtilization"),
        (objective(200, 1.5), "targetUtilization"),
        (
            Objective {
                cores_per_instance: Some(0.0),
                ..Objective::default()
            },
            "coresPerInstance",
        ),
    ] {
        let e = o.check().unwrap_err();
        assert!(e.contains(want), "{e}");
    }
}

fn usage(t: f64, sidecar: f64, app: f64, processes: u32) -> (f64, wire::Usage) {
    (
        t,
        wire::Usage {
            sidecar_cpu_seconds: sidecar,
            sidecar_rss_bytes: 20 << 20,
            app_cpu_seconds: app,
            app_rss_bytes: 50 << 20,
            app_processes: processes,
            cpu_cores: 4,
        },
    )
}

#[test]
fn usage_rates_come_from_the_first_and_last_samples() {
    let s = [
        usage(0.0, 1.0, 10.0, 1),
        usage(2.0, 1.2, 11.0, 2),
        usage(10.0, 2.0, 14.0, 1),
    ];
    let refs: Vec<(f64, &wire::Usage)> = s.iter().map(|(t, u)| (*t, u)).collect();
    let u = Usage::from_samples(&refs).unwrap();
    assert_eq!(u.sidecar_cores, Some(0.1));
    assert_eq!(u.app_cores, Some(0.4));
    assert_eq!(
        (u.sidecar_rss_bytes, u.app_rss_bytes, u.cpu_cores),
        (20 << 20, 50 << 20, 4)
    );
    // One sample: memory, no rate. An app whose helper exited never goes negative.
    let u = Usage::from_samples(&refs[..1]).unwrap();
    assert_eq!((u.sidecar_cores, u.app_cores), (None, None));
    let back = [usage(0.0, 1.0, 10.0, 2), usage(2.0, 1.2, 9.0, 1)];
    let refs: Vec<(f64, &wire::Usage)> = back.iter().map(|(t, u)| (*t, u)).collect();
    assert_eq!(Usage::from_samples(&refs).unwrap().app_cores, Some(0.0));
    // No app: no app numbers.
    let none = [usage(0.0, 1.0, 0.0, 0), usage(2.0, 1.2, 0.0, 0)];
    let refs: Vec<(f64, &wire::Usage)> = none.iter().map(|(t, u)| (*t, u)).collect();
    let u = Usage::from_samples(&refs).unwrap();
    assert_eq!((u.app_cores, u.app_rss_bytes), (None, 0));
    assert!(Usage::from_samples(&[]).is_none());
}

#[test]
fn the_view_joins_traffic_and_usage_per_service() {
    let stats = StatsView {
        services: vec![crate::fleet::StatRow {
            namespace: "default".into(),
            name: "payment".into(),
            backend: String::new(),
            proxies: 2,
            requests: 6000,
            success_rate: Some(0.99),
            rps: 100.0,
            p50_ms: Some(5.0),
            p95_ms: Some(20.0),
            p99_ms: Some(40.0),
        }],
        ..StatsView::default()
    };
    let who = |svc: &str, node: &str| Reporter {
        namespace: "default".into(),
        service: svc.into(),
        identity: String::new(),
        node: node.into(),
    };
    let u = |app: Option<f64>| Usage {
        sidecar_cores: Some(0.05),
        app_cores: app,
        sidecar_rss_bytes: 10,
        app_rss_bytes: if app.is_some() { 100 } else { 0 },
        cpu_cores: 2,
    };
    let usage = vec![
        (who("payment", "p1"), u(Some(0.3))),
        (who("payment", "p2"), u(None)),
        (who("", "client"), u(Some(5.0))),
    ];
    let v = view(&stats, &usage, &Objective::default(), DEFAULT_WINDOW);
    assert_eq!(
        v.services.len(),
        1,
        "the client-only sidecar is no service: {v:?}"
    );
    let s = &v.services[0];
    assert_eq!(s.service, "default/payment");
    let l = &s.load;
    assert_eq!((l.instances, l.apps_measured), (2, 1));
    assert_eq!(l.sidecar_cores, Some(0.1));
    assert_eq!(l.app_cores, Some(0.6), "0.3 on the one measured, times 2");
    assert_eq!((l.sidecar_memory_bytes, l.app_memory_bytes), (20, 100));
    assert_eq!(l.error_rate, Some(0.01));
    assert_eq!(s.recommendation.recommended_instances, 1);
    assert!(s.recommendation.arithmetic.contains("measured on 1 of 2"));
    let text = encode_metrics(&v);
    assert!(
        text.contains(
            "trellis_capacity_recommended_instances{namespace=\"default\",service=\"payment\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("trellis_capacity_latency_objective_seconds 0.2"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
}
