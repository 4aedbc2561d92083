/*! widget-identity browser SDK v1: who is this visitor, headless. No dependencies. */
// Served as an ES module at /widget/v1/identity.js. The classic-script form,
// /widget/v1/identity.global.js, is this file up to the "module exports" marker wrapped in a
// function and ending in `window.WidgetIdentity = ...` (see routes.py), so both forms run
// the same code. Types: /widget/v1/identity.d.ts.

const VERSION = "1";
const STORAGE_PREFIX = "wi:v1:";
// Codes after which a session token is useless but a fresh resolution may succeed.
const SESSION_GONE = new Set(["session_ended", "invalid_session_token"]);

class WidgetIdentityError extends Error {
  constructor(code, status, detail, problem) {
    super(`${code}: ${detail}`);
    this.name = "WidgetIdentityError";
    this.code = code;
    this.status = status;
    this.detail = detail;
    this.problem = problem || null;
  }
}

// A classic script knows its own URL only while it runs; a module gets it from import.meta.
let scriptUrl =
  (typeof document !== "undefined" && document.currentScript && document.currentScript.src) || "";

function setScriptUrl(url) {
  scriptUrl = url;
}

function baseUrlOf(options) {
  const explicit = options.baseUrl;
  if (explicit) return String(explicit).replace(/\/+$/, "");
  if (!scriptUrl) {
    throw new WidgetIdentityError("base_url_unknown", 0, "give options.baseUrl: the script URL is unknown");
  }
  // The script lives at <base>/widget/v1/identity.js, also when <base> has a path prefix.
  return new URL("../../", scriptUrl).href.replace(/\/+$/, "");
}

// localStorage can be missing or throw (sandboxed frames, some private modes): then the
// visitor lasts as long as the page, which is the most a browser lets us have.
const memoryStore = new Map();
function readItem(key) {
  try {
    const value = globalThis.localStorage.getItem(key);
    if (value !== null) return value;
  } catch (_) {}
  return memoryStore.has(key) ? memoryStore.get(key) : null;
}
function writeItem(key, value) {
  memoryStore.set(key, value);
  try {
    globalThis.localStorage.setItem(key, value);
  } catch (_) {}
}

async function call(method, url, { body, bearer } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", // bearer tokens only: no cookies cross origins
      cache: "no-store",
    });
  } catch (cause) {
    throw new WidgetIdentityError(
      "network_error",
      0,
      `${method} ${url} failed before any answer (offline, or refused by CORS): ${cause && cause.message}`,
    );
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (_) {}
  if (!response.ok) {
    const problem = payload && typeof payload.code === "string" ? payload : null;
    throw new WidgetIdentityError(
      problem ? problem.code : "http_error",
      response.status,
      problem && problem.detail ? problem.detail : `HTTP ${response.status}`,
      problem,
    );
  }
  if (payload === null) {
    throw new WidgetIdentityError("http_error", response.status, "the answer is not JSON");
  }
  return payload;
}

function defined(entries) {
  const out = {};
  for (const [key, value] of Object.entries(entries)) if (value !== undefined && value !== null) out[key] = value;
  return out;
}

class WidgetIdentityClient extends EventTarget {
  #options = null;
  #session = null;
  #userToken = null; // the last token the user.token callback gave
  #generation = 0;
  #resolving = null;
  #listening = false;

  constructor() {
    super();
    this.version = VERSION;
  }

  /** A separate client (e.g. another storageKey); the module's default one is WidgetIdentity. */
  create() {
    return new WidgetIdentityClient();
  }

  /** Resolve who this visitor is with the options object of the product page; again with new
   * options to change user, externalId, fields or customData. */
  async start(options) {
    if (!options || typeof options.token !== "string" || !options.token) {
      throw new WidgetIdentityError("invalid_options", 0, "options.token (the widget token) is required");
    }
    const user = options.user;
    if (user && user.token !== undefined && typeof user.token !== "string" && typeof user.token !== "function") {
      throw new WidgetIdentityError("invalid_options", 0, "user.token must be a string or a function");
    }
    this.#options = { ...options };
    this.#userToken = null;
    this.#listen();
    return this.#resolve("start");
  }

  /** The resolved identity, or null before start() finishes. */
  identity() {
    return this.#session ? this.#session.identity : null;
  }

  /** The whole current session (ids, token, merge, collect), or null. */
  session() {
    return this.#session;
  }

  /** One page of the conversations this session's scope may see, newest first. */
  async history({ limit, cursor } = {}) {
    const query = new URLSearchParams(defined({ limit, cursor })).toString();
    return this.#withSession((session) =>
      call("GET", `${this.#base()}/widget/sessions/${session.sessionId}/history${query ? `?${query}` : ""}`, {
        bearer: session.sessionToken,
      }),
    );
  }

  /** Log this browser out: the server ends the session and hands out a fresh visitor token,
   * kept for this widget token; every tab of this browser then resolves as that new,
   * anonymous visitor (this one too: the returned session). */
  async logout() {
    const session = await this.#current();
    const out = await call("POST", `${this.#base()}/widget/sessions/${session.sessionId}/logout`, {
      bearer: session.sessionToken,
    });
    writeItem(this.#key(), out.visitorToken);
    // The other tabs listen for this key (storage event); the value only has to change.
    writeItem(`${this.#key()}:logout`, `${Date.now()}:${Math.random()}`);
    this.#forgetUser();
    return this.#resolve("logout");
  }

  /** Forget the session and stop listening to other tabs. */
  stop() {
    this.#generation += 1;
    this.#session = null;
    this.#options = null;
    if (this.#listening && typeof window !== "undefined") window.removeEventListener("storage", this.#onStorage);
    this.#listening = false;
  }

  #onStorage = (event) => {
    if (!this.#options || event.key !== `${this.#key()}:logout`) return;
    this.#forgetUser();
    this.#session = null;
    this.#resolve("logout-elsewhere").catch((error) =>
      this.dispatchEvent(new CustomEvent("error", { detail: error })),
    );
  };

  #listen() {
    if (!this.#listening && typeof window !== "undefined") {
      window.addEventListener("storage", this.#onStorage);
      this.#listening = true;
    }
  }

  #forgetUser() {
    // Logged out: nothing of the person stays, only the widget's own settings.
    const { user, fields, customData, ...rest } = this.#options || {};
    this.#options = rest;
    this.#userToken = null;
  }

  #base() {
    if (!this.#options) throw new WidgetIdentityError("not_started", 0, "call start(options) first");
    return baseUrlOf(this.#options);
  }

  #key() {
    return `${STORAGE_PREFIX}${this.#options.storageKey || "default"}:${this.#options.token}`;
  }

  async #current() {
    if (this.#resolving) await this.#resolving.catch(() => {});
    if (!this.#session) throw new WidgetIdentityError("not_started", 0, "no session: call start(options) first");
    return this.#session;
  }

  async #withSession(request) {
    const session = await this.#current();
    try {
      return await request(session);
    } catch (error) {
      // Expired or ended elsewhere: resolve again once (a logout elsewhere arrives as a
      // storage event and has already dropped the user).
      if (!(error instanceof WidgetIdentityError) || !SESSION_GONE.has(error.code)) throw error;
      if (this.#session === session) await this.#resolve("refresh");
      return request(await this.#current());
    }
  }

  async #token(fresh) {
    const user = this.#options.user;
    if (!user || user.token === undefined || user.token === null) return undefined;
    if (typeof user.token === "string") return user.token;
    if (fresh || this.#userToken === null) {
      const token = await user.token();
      if (typeof token !== "string" || !token) {
        throw new WidgetIdentityError("invalid_options", 0, "the user.token callback gave no token");
      }
      this.#userToken = token;
    }
    return this.#userToken;
  }

  #body(token) {
    const options = this.#options;
    const user = options.user || {};
    const userBody = defined({ token, externalId: user.externalId, name: user.name, email: user.email });
    return defined({
      widgetToken: options.token,
      visitorToken: readItem(this.#key()) || undefined,
      user: Object.keys(userBody).length ? userBody : undefined,
      fields: options.fields && Object.keys(options.fields).length ? options.fields : undefined,
      customData: options.customData && Object.keys(options.customData).length ? options.customData : undefined,
    });
  }

  #resolve(reason) {
    const generation = ++this.#generation;
    const run = async () => {
      const url = `${this.#base()}/widget/sessions`;
      let out;
      try {
        out = await call("POST", url, { body: this.#body(await this.#token(false)) });
      } catch (error) {
        const callback = this.#options && this.#options.user && typeof this.#options.user.token === "function";
        if (!(error instanceof WidgetIdentityError) || error.code !== "token_expired" || !callback) throw error;
        out = await call("POST", url, { body: this.#body(await this.#token(true)) });
      }
      if (generation !== this.#generation) return out; // a newer start() or logout won
      writeItem(this.#key(), out.visitorToken);
      this.#session = out;
      this.dispatchEvent(
        new CustomEvent("identitychange", { detail: { reason, identity: out.identity, session: out } }),
      );
      return out;
    };
    const pending = run();
    this.#resolving = pending;
    return pending;
  }
}

function createWidgetIdentity() {
  return new WidgetIdentityClient();
}

const WidgetIdentity = new WidgetIdentityClient();

// --- module exports (the classic-script form ends above this line) ---
setScriptUrl(import.meta.url);
export { WidgetIdentity, WidgetIdentityClient, WidgetIdentityError, createWidgetIdentity, VERSION };
export default WidgetIdentity;
