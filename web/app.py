"""The Quart-Trio application factory. Everything a route needs comes from `services`."""

from __future__ import annotations

from quart_trio import QuartTrio

from web import availability, chat, docs, health, jobs, keys, metrics, models, retrieval, status
from web.errors import install_error_handlers
from web.services import Services


def create_app(services: Services) -> QuartTrio:
    app = QuartTrio("sn1_gateway", static_folder=None)  # no /static route serving the working folder
    app.config["MAX_CONTENT_LENGTH"] = services.settings.server.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    install_error_handlers(app)
    app.register_blueprint(health.blueprint(services))
    app.register_blueprint(keys.blueprint(services))
    app.register_blueprint(chat.blueprint(services))
    app.register_blueprint(jobs.blueprint(services))
    app.register_blueprint(models.blueprint(services))
    app.register_blueprint(status.blueprint(services))
    app.register_blueprint(retrieval.blueprint(services))
    app.register_blueprint(availability.blueprint(services))
    app.register_blueprint(metrics.blueprint(services))
    app.register_blueprint(docs.blueprint())
    # The chat route is answered in front of Quart's request machinery (see `web.chat.chat_entry`).
    app.asgi_app = chat.chat_entry(services, app.asgi_app,  # type: ignore[method-assign,assignment]
                                   body_timeout_s=app.config["BODY_TIMEOUT"])
    return app
