"""A small ShareGPT-like prompt set for `kevlard bench`, written for kevlard (no downloads).

Each entry is the content of one user message. Lengths vary on purpose, from a few words to a
few paragraphs, so that prefill cost varies across requests the way it does in real chat
traffic. Request i of a benchmark uses PROMPTS[i % len(PROMPTS)], so a run is reproducible.
"""
from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "What is the capital of Australia?",
    "Tell me a joke about computers.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain recursion to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "What are three tips for sleeping better?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me five names for a small bakery.",
    "What is the difference between a virus and a bacterium?",
    "Write a short thank-you note to a colleague who helped me move house.",
    "List the planets of the solar system in order from the sun.",
    "How many minutes are there in a week? Show your working.",
    "What does HTTP status code 503 mean?",
    "Suggest a vegetarian dinner I can cook in twenty minutes.",
    "Explain what a hash table is and why lookups are fast on average.",
    "Is it better to rent or buy a home? Give arguments for both sides.",
    "Write a limerick about a cat who learned to code.",
    "What causes the seasons on Earth?",
    "Hi!",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "What is a good way to start learning to play the guitar as an adult?",
    "Describe the water cycle in simple terms.",
    "Write a SQL query that returns the ten customers with the highest total order value from "
    "tables customers(id, name) and orders(id, customer_id, amount).",
    "I have a job interview tomorrow for a junior data analyst position. What questions should I "
    "expect, and how should I prepare tonight?",
    "Explain the difference between TCP and UDP, and give one example application for each.",
    "My sourdough bread comes out dense and flat. I feed my starter once a day, let the dough "
    "rise for about four hours at room temperature, and bake at 220 C. What might be going "
    "wrong?",
    "Write a short story, about one paragraph long, about a lighthouse keeper who finds a message "
    "in a bottle.",
    "What are the main causes of inflation, and how do central banks try to control it?",
    "Proofread this sentence: 'Their going to the libary tomorow to study for they're exams.'",
    "Give me a weekly workout plan for a beginner who can train three times a week at home "
    "without equipment.",
    "Explain what Git branches are and how merging differs from rebasing.",
    "What is photosynthesis?",
    "Compare electric cars and petrol cars in terms of running costs, maintenance and "
    "environmental impact.",
    "How does a refrigerator keep food cold?",
    "Write a Python function that checks whether a string is a palindrome, ignoring spaces and "
    "punctuation, and include two example calls.",
    "Which books would you recommend to someone who loved The Hobbit?",
    "What is the Pythagorean theorem? Give an example with numbers.",
    "Draft a polite email to my landlord asking when the broken heating will be repaired. It has "
    "been out for a week, I reported it twice, and the nights are getting cold.",
    "Explain how vaccines train the immune system.",
    "What should I pack for a three-day hiking trip in the mountains in late spring?",
    "Why do we have leap years?",
    "I am planning a small birthday party for my daughter, who is turning seven. About twelve "
    "children will come, the party is at our house on a Saturday afternoon, and the budget is "
    "modest. She loves dinosaurs and drawing.\n\nCan you suggest a schedule for the afternoon "
    "with games and activities, a simple menu that most children will eat, and a few ideas for "
    "small take-home gifts that fit the dinosaur theme without costing much?",
    "Explain the following error and how to fix it: \"TypeError: 'NoneType' object is not "
    "subscriptable\" raised on the line `name = user['name']`.",
    "What is the difference between weather and climate?",
    "Write a product description for a stainless steel water bottle that keeps drinks cold for "
    "24 hours.",
    "How do noise-cancelling headphones work?",
    "Here is a paragraph from my essay:\n\n\"Social media has changed the way people "
    "communicate. In the past people wrote letters or called each other on the phone, but now "
    "they send short messages and pictures many times a day. Some people think this makes "
    "relationships weaker because conversations are shorter, while others think it helps people "
    "stay in touch with friends who live far away.\"\n\nPlease improve the style and make the "
    "argument clearer, while keeping it about the same length.",
    "What are the pros and cons of working from home?",
    "Explain big-O notation and give the complexity of binary search and of bubble sort.",
    "Name three famous paintings by Vincent van Gogh.",
    "How can I make my small balcony garden more productive? I grow tomatoes, basil and "
    "strawberries in pots, it gets about five hours of direct sun, and last year the tomatoes "
    "split and the basil kept flowering early.",
    "What is the role of mitochondria in a cell?",
    "Create a packing checklist for moving to a new apartment.",
    "We are a team of four developers maintaining a web service written in Python. Deployments "
    "happen by hand on Friday afternoons, tests are run locally when someone remembers, and last "
    "month a bad release took the service down for three hours.\n\nPropose a step-by-step plan "
    "to introduce continuous integration and safer deployments over the next two months. For "
    "each step say what it costs in effort, what risk it reduces, and how we would know it is "
    "working. Keep in mind that we cannot stop shipping features while we do this.",
    "What does 'carpe diem' mean?",
    "Explain the rules of chess for the knight and the bishop.",
    "Write a motivational message for someone starting their first marathon training.",
    "How do I calculate compound interest? Show the formula and an example over five years.",
    "What are black holes and how do they form?",
    "Give me a recipe for pancakes for four people.",
    "Explain what an API is to someone who does not program.",
    "Tell me about the history of the printing press and why it mattered.",
)
