//! `GET /`: the operator dashboard, and `GET /static/{file}`: its assets.
//!
//! The page, its script and stylesheet (`static/`) and the vendored uPlot
//! charting library (`static/vendor/`, see its README) are embedded in the
//! binary at compile time, so the service serves them with no build step, no
//! npm and no files to deploy beside it. The page reads `/api/stats` every
//! second and the live tail from `/ws`.

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::{web, HttpResponse};

/// Locks the page to its own origin: scripts, styles and connections (`/ws`,
/// `/api/stats`) come from the service itself; inline styles are allowed
/// because uPlot sizes its elements with them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// An embedded file: its name under `/static/`, content type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file served under `/static/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/dashboard.css"),
    },
    Asset {
        name: "dead_letters.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/dead_letters.js"),
    },
    Asset {
        name: "dead_letters.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/dead_letters.css"),
    },
    Asset {
        name: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/vendor/uPlot.min.css"),
    },
    Asset {
        name: "vendor/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_str!("../../static/vendor/LICENSE"),
    },
];

/// The page itself.
const INDEX: &str = include_str!("../../static/index.html");

/// `GET /`: the dashboard page.
pub async fn index() -> HttpResponse {
    page(INDEX, "text/html; charset=utf-8")
}

/// `GET /static/{file:.*}`: an embedded asset, or 404.
pub async fn asset(file: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|asset| asset.name == file.as_str()) {
        Some(asset) => page(asset.body, asset.content_type),
        None => HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("no such asset\n"),
    }
}

/// A response for embedded content. `no-cache` makes the browser revalidate,
/// so a new version of the service is picked up on the next load.
fn page(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{body::to_bytes, http::StatusCode, test, App};

    fn app() -> App<
        impl actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse,
            Error = actix_web::Error,
            InitError = (),
        >,
    > {
        App::new()
            .route("/", web::get().to(index))
            .route("/static/{file:.*}", web::get().to(asset))
    }

    #[actix_web::test]
    async fn the_page_references_only_assets_that_exist() {
        let app = test::init_service(app()).await;
        let response =
            test::call_service(&app, test::TestRequest::get().uri("/").to_request()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = to_bytes(response.into_body()).await.expect("body");
        let html = std::str::from_utf8(&body).expect("utf-8");
        for reference in [
            "/static/dashboard.js",
            "/static/dashboard.css",
            "/static/vendor/uPlot.iife.min.js",
            "/static/vendor/uPlot.min.css",
        ] {
            assert!(
                html.contains(reference),
                "the page does not load {reference}"
            );
            let request = test::TestRequest::get().uri(reference).to_request();
            let response = test::call_service(&app, request).await;
            assert_eq!(response.status(), StatusCode::OK, "{reference}");
            assert!(response
                .headers()
                .contains_key(header::CONTENT_SECURITY_POLICY));
        }
    }

    #[actix_web::test]
    async fn unknown_assets_are_404() {
        let app = test::init_service(app()).await;
        for uri in [
            "/static/nope.js",
            "/static/../Cargo.toml",
            "/static/vendor/",
        ] {
            let response =
                test::call_service(&app, test::TestRequest::get().uri(uri).to_request()).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{uri}");
        }
    }

    #[actix_web::test]
    async fn assets_have_their_content_type() {
        let app = test::init_service(app()).await;
        let request = test::TestRequest::get()
            .uri("/static/dashboard.css")
            .to_request();
        let response = test::call_service(&app, request).await;
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .expect("content type");
        assert_eq!(content_type, "text/css; charset=utf-8");
    }
}
