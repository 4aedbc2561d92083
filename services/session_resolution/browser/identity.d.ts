// Types of the widget-identity browser SDK, served at /widget/v1/identity.d.ts beside
// /widget/v1/identity.js (ES module) and /widget/v1/identity.global.js (classic script that
// sets window.WidgetIdentity and window.WidgetIdentityError).

/** An extra form field, as the product page writes it. The widget token's own settings decide
 * what the server asks for (see `Session.collect`); these options describe the same form. */
export interface ExtraDataCollectionField {
  key: string;
  label: string;
  type?: "text" | "email" | "number" | "boolean";
  required?: boolean;
}

export interface UserOptions {
  /** A contact token from the site's backend, or a function fetching a fresh one. A function
   * is asked again (once) when the server answers `token_expired`. */
  token?: string | (() => Promise<string>);
  externalId?: string;
  /** Without a token these stay `unverified` (source "browser"). */
  name?: string;
  email?: string;
}

export interface WidgetIdentityOptions {
  /** The public widget token, `wit_...`. */
  token: string;
  collectUserData?: boolean;
  prefillUserData?: { name?: boolean; email?: boolean };
  extraDataCollectionFields?: ExtraDataCollectionField[];
  user?: UserOptions;
  customData?: Record<string, string | number | boolean | null>;
  /** Values the visitor typed into the extra fields, by key. */
  fields?: Record<string, string | number | boolean | null>;
  /** The widget-identity server; default: where this script was loaded from. */
  baseUrl?: string;
  /** A separate visitor namespace in this browser's storage (e.g. a second demo device). */
  storageKey?: string;
}

export type Level = "anonymous" | "unverified" | "verified";

export interface Attribute {
  value: unknown;
  source: "server" | "browser";
  verified: boolean;
}

export interface Identity {
  level: Level;
  visitorId: string;
  contactId: string | null;
  externalId: string | null;
  externalIdVerified: boolean;
  attributes: Record<string, Attribute>;
}

export interface CollectField {
  name: string;
  label: string;
  type: string;
  required: boolean;
  maxLength?: number | null;
}

export interface Session {
  sessionId: string;
  sessionToken: string;
  expiresAt: string;
  visitorToken: string;
  identity: Identity;
  /** A login merge of this browser's anonymous history into the verified scope. */
  merge: { id: string; status: string } | null;
  collect: { collectUserData: boolean; ask: CollectField[]; prefill: Record<string, string> };
}

export interface HistoryMessage {
  id: string;
  author: string;
  text: string;
  senderVerified: boolean;
  createdAt: string;
}

export interface HistoryPage {
  conversations: { id: string; createdAt: string; messages: HistoryMessage[] }[];
  nextCursor: string | null;
}

export type ChangeReason = "start" | "logout" | "logout-elsewhere" | "refresh";

export interface IdentityChangeDetail {
  reason: ChangeReason;
  identity: Identity;
  session: Session;
}

/** Every failure: problem+json `code` from the server, or `network_error`, `http_error`,
 * `invalid_options`, `not_started`, `base_url_unknown` from the SDK (status 0). */
export declare class WidgetIdentityError extends Error {
  readonly name: "WidgetIdentityError";
  readonly code: string;
  readonly status: number;
  readonly detail: string;
  readonly problem: Record<string, unknown> | null;
}

export interface WidgetIdentityEventMap {
  identitychange: CustomEvent<IdentityChangeDetail>;
  /** A background re-resolution (after a logout in another tab) failed. */
  error: CustomEvent<WidgetIdentityError>;
}

export declare class WidgetIdentityClient extends EventTarget {
  readonly version: string;
  create(): WidgetIdentityClient;
  start(options: WidgetIdentityOptions): Promise<Session>;
  identity(): Identity | null;
  session(): Session | null;
  history(page?: { limit?: number; cursor?: string }): Promise<HistoryPage>;
  logout(): Promise<Session>;
  stop(): void;
  addEventListener<K extends keyof WidgetIdentityEventMap>(
    type: K,
    listener: (event: WidgetIdentityEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof WidgetIdentityEventMap>(
    type: K,
    listener: (event: WidgetIdentityEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export declare const VERSION: string;
export declare const WidgetIdentity: WidgetIdentityClient;
export declare function createWidgetIdentity(): WidgetIdentityClient;
export default WidgetIdentity;

declare global {
  interface Window {
    /** Set by the classic-script form. */
    WidgetIdentity: WidgetIdentityClient;
    WidgetIdentityError: typeof WidgetIdentityError;
  }
}
