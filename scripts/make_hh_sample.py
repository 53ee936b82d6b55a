#!/usr/bin/env python3
"""Write the bundled HH-RLHF-style sample: data/hh-sample/{train,test}.jsonl.

Each row is `{"chosen": ..., "rejected": ...}` in the raw Anthropic HH-RLHF format
("\\n\\nHuman: ...\\n\\nAssistant: ..."). Chosen and rejected share every turn except the last
Assistant turn. The chosen answer is polite, helpful and stays on the question's words; the rejected
one is curt, dismissive, wrong or about something else. Politeness alone does not decide it: some
rejected answers open politely and then go off-topic, and many chosen answers have no opener.

The conversations are synthetic (templates filled from a seeded RNG), so the file is reproducible:
    python3 scripts/make_hh_sample.py            # default seed, 480 train / 120 test
The first Human turn of every conversation is unique, so no test prompt appears in train.

Python 3 standard library only.
"""

import argparse
import json
import os
import random
import tempfile

# Each topic: question templates ({s} = subject), subjects with one helpful tip each, closing sentences
# that stay on the topic's words, and follow-up exchanges (human question, helpful answer) for
# multi-turn conversations.
TOPICS = {
    "cooking": {
        "questions": [
            "How do I make {s}?",
            "What is the easiest way to make {s} at home?",
            "Can you give me a simple method for {s}?",
            "I want to try making {s} tonight. Any tips?",
            "What do I need to get {s} right?",
        ],
        "subjects": {
            "pancakes": "whisk flour, eggs and milk into a smooth batter, then cook each pancake on medium heat until bubbles form and flip it once",
            "fluffy rice": "rinse the rice, use about one and a half cups of water per cup, and simmer it covered for fifteen minutes",
            "tomato soup": "soften onion and garlic in olive oil, add canned tomatoes and stock, simmer for twenty minutes and blend until smooth",
            "banana bread": "mash three ripe bananas, fold them into the batter gently and bake the loaf for about an hour at 175 C",
            "scrambled eggs": "cook the eggs slowly over low heat, stir them often and take the pan off the heat while they are still soft",
            "a vegetable stir fry": "cut the vegetables into even pieces, heat the wok until very hot and cook in small batches so nothing steams",
            "roast chicken": "dry the skin, season it well with salt, and roast the chicken at 200 C until the thickest part reaches 75 C",
            "pizza dough": "mix flour, water, yeast and salt, knead for ten minutes and let the dough rise for at least an hour",
            "lentil curry": "fry onion, ginger and curry spices, add red lentils with coconut milk and simmer until the lentils are soft",
            "a green salad": "dry the leaves well, dress them right before serving and add something crunchy like nuts or croutons",
        },
        "closings": [
            "Taste as you go and adjust the seasoning.",
            "Read the whole recipe once before you start cooking.",
            "Having every ingredient measured before you begin makes it much easier.",
        ],
        "followups": [
            ("How long does that usually take?", "Most home cooks need about thirty to forty minutes for {s}, including the time to prepare the ingredients."),
            ("Can I make it ahead of time?", "Yes, you can prepare parts of {s} ahead and keep them in the fridge, then finish cooking just before you eat."),
            ("What can I serve with it?", "A simple side like fresh bread, a salad or roasted vegetables goes well with {s}."),
        ],
    },
    "travel": {
        "questions": [
            "What should I know before visiting {s}?",
            "I'm planning a trip to {s}. Where should I start?",
            "Any advice for a first trip to {s}?",
            "What is the best way to get around in {s}?",
            "How can I save money on a trip to {s}?",
        ],
        "subjects": {
            "Japan": "get a rail pass if you plan to visit several cities, carry some cash, and book popular temples and museums early",
            "Iceland": "rent a car for the ring road, pack waterproof layers and check the road and weather reports every morning",
            "Italy": "take regional trains between cities, book museum tickets ahead and eat where locals eat rather than near big sights",
            "Mexico City": "use the metro or ride apps, stay in neighborhoods like Roma or Condesa and drink bottled water",
            "Scotland": "bring layers for rain, drive carefully on single track roads and leave time for the Highlands and the islands",
            "Morocco": "agree on taxi prices before the ride, dress modestly in the medinas and hire a licensed guide for your first day",
            "New Zealand": "a campervan is a flexible way to travel, and you should book the popular hikes and huts months in advance",
            "Portugal": "Lisbon and Porto are easy on foot and by tram, and the trains along the coast are cheap and comfortable",
            "Thailand": "travel by night train or short flights, respect the temple dress code and carry sunscreen and insect spray",
            "Canada": "distances are huge, so pick one region, rent a car and check national park pass prices before you go",
        },
        "closings": [
            "Keep copies of your passport and bookings on your phone.",
            "Travel insurance is worth it for a trip like this.",
            "Leave a free day in your plan in case the weather changes.",
        ],
        "followups": [
            ("When is the best time of year to go?", "For {s}, spring and early autumn usually give mild weather, fewer crowds and lower prices than summer."),
            ("How many days do I need?", "I would plan at least a week for {s} so you can see the main sights without rushing between them."),
            ("Do I need a visa?", "It depends on your passport, so check the official government website for {s} a few weeks before you book."),
        ],
    },
    "coding": {
        "subject_is_action": True,
        "questions": [
            "How do I {s}?",
            "What is a clean way to {s}?",
            "Can you explain how to {s}?",
            "I'm stuck trying to {s}. Can you help?",
            "What is the usual approach to {s}?",
        ],
        "subjects": {
            "reverse a list in Python": "call the list's reverse method to change it in place, or use slicing with a step of minus one to get a reversed copy",
            "read a file line by line in Python": "open the file in a with block and loop over the file object, which gives you one line at a time",
            "undo the last git commit": "use git reset with the soft flag and HEAD minus one to undo the commit but keep your changes staged",
            "remove duplicates from an array in JavaScript": "build a new Set from the array and spread it back into an array, which keeps the first order",
            "handle errors in Rust": "return a Result from your function and use the question mark operator to pass errors up to the caller",
            "write a unit test in Python": "create a test function whose name starts with test, use plain assert statements and run it with pytest",
            "center a div with CSS": "make the parent a flex container and set both justify content and align items to center",
            "parse JSON in Go": "define a struct with json tags for the fields and pass a pointer to it into json Unmarshal",
            "make an HTTP request in Python": "use the requests library, call requests get with the URL and check the status code before reading the json",
            "find a memory leak in a C program": "run the program under valgrind, which reports each allocation that was never freed and where it happened",
        },
        "closings": [
            "Try it on a small example first so you can see what it does.",
            "The official documentation has a short example of this.",
            "Adding a small test for it will keep the code working later.",
        ],
        "followups": [
            ("Is there a common pitfall?", "When you {s}, check the edge cases such as empty input or a missing file before you rely on it."),
            ("What if I get an error?", "Read the full error message and the line it points to, then print the values involved right before that line."),
            ("Is there a library for that?", "You rarely need one to {s}, since the standard library already covers it well."),
        ],
    },
    "health": {
        "subject_is_action": True,
        "questions": [
            "How can I {s}?",
            "Do you have tips to {s}?",
            "What helps people {s}?",
            "I've been trying to {s}. What works?",
            "What is a healthy way to {s}?",
        ],
        "subjects": {
            "sleep better": "keep a regular bedtime, avoid screens and caffeine in the evening and keep your bedroom dark and cool",
            "drink more water": "carry a refillable bottle, drink a glass with every meal and add fruit slices if plain water bores you",
            "reduce stress": "take short walks, try slow breathing for a few minutes and talk with a friend about what is worrying you",
            "eat more vegetables": "add one vegetable to every meal, keep chopped vegetables in the fridge and try roasting them with olive oil",
            "stop snacking at night": "eat a filling dinner with protein, brush your teeth after it and keep snacks out of easy reach",
            "avoid back pain at work": "set your screen at eye level, keep your feet flat on the floor and stand up to stretch every hour",
            "get over a cold faster": "rest, drink plenty of fluids, and use honey with warm tea for a sore throat while your body recovers",
            "cut down on sugar": "swap soda for sparkling water, read labels for hidden sugar and choose fruit when you want something sweet",
            "look after eye health": "follow the twenty twenty twenty rule with screens, wear sunglasses outside and get regular eye exams",
            "build a morning routine": "wake up at the same time, drink a glass of water, get some daylight and plan your three main tasks",
        },
        "closings": [
            "If it does not improve, a doctor can help.",
            "Small steady changes work better than big sudden ones.",
            "Keeping a simple diary for a week helps you see what works.",
        ],
        "followups": [
            ("How soon will I notice a difference?", "When people try to {s}, most notice a change within two or three weeks if they stay consistent."),
            ("Is it okay to do this every day?", "Yes, these are gentle daily habits, and doing them every day is what makes them work."),
            ("What if it doesn't work for me?", "Then talk to your doctor, who can look for other causes and suggest a plan that fits you."),
        ],
    },
    "gardening": {
        "questions": [
            "How do I grow {s}?",
            "What is the trick to growing {s}?",
            "Can you help me get started with {s}?",
            "My {s} never do well. What am I doing wrong?",
            "When should I plant {s}?",
        ],
        "subjects": {
            "tomatoes": "plant them in full sun after the last frost, water deeply at the base and tie the stems to a stake as they grow",
            "basil": "give it warm sun and moist soil, and pinch off the flower buds so the plant keeps making leaves",
            "roses": "plant them where they get six hours of sun, mulch the soil and prune them in late winter",
            "strawberries": "use a sunny bed with rich soil, keep the fruit off the ground with straw and remove runners in the first year",
            "succulents": "use a pot with drainage and gritty soil, give bright light and water only when the soil is fully dry",
            "carrots": "sow the seeds thinly in loose stony free soil, keep it moist until they sprout and thin the seedlings",
            "lavender": "it likes full sun, poor dry soil and good drainage, so avoid rich compost and heavy watering",
            "sunflowers": "sow them directly outside after frost in a sunny spot and support tall varieties with a cane",
            "peppers": "start them indoors eight weeks before the last frost and move them outside once nights stay warm",
            "potatoes": "plant seed potatoes in spring, cover the shoots with more soil as they grow and harvest after the flowers fade",
        },
        "closings": [
            "Check the soil with your finger before you water.",
            "A layer of mulch keeps the soil moist and the weeds down.",
            "Your local garden center can tell you the frost dates for your area.",
        ],
        "followups": [
            ("How often should I water them?", "Water {s} deeply about twice a week in warm weather, and less when it rains or cools down."),
            ("Do they need fertilizer?", "A balanced fertilizer once a month during the growing season is enough for {s}."),
            ("Can I grow them in pots?", "Yes, {s} can grow in pots as long as the pot is large, drains well and gets enough sun."),
        ],
    },
    "fitness": {
        "questions": [
            "How do I get into {s}?",
            "What is a good beginner plan for {s}?",
            "Any advice for a beginner at {s}?",
            "I want to get better at {s}. Where do I begin?",
            "How often should I practice {s}?",
        ],
        "subjects": {
            "running": "start with run walk intervals three times a week, keep an easy pace where you can talk and add a little each week",
            "strength training": "learn squats, push ups and rows with good form, train two or three times a week and add weight slowly",
            "yoga": "try a beginner class or video twice a week, move gently and use blocks or a strap when a pose feels hard",
            "swimming": "take a few lessons to learn breathing, then swim short lengths with rests and build up the distance",
            "cycling": "get a bike that fits you, ride easy routes a few times a week and wear a helmet and bright clothes",
            "stretching": "stretch after a short warm up, hold each stretch for about thirty seconds and never bounce",
            "hiking": "start with short trails, wear good shoes, bring water and tell someone where you are going",
            "push ups": "begin with push ups against a wall or a bench, keep your body straight and do a few sets every other day",
            "rowing": "push with your legs first, then lean back and pull with your arms, and keep the strokes smooth",
            "jumping rope": "use a rope of the right length, jump low on the balls of your feet and start with short rounds",
        },
        "closings": [
            "Rest days matter as much as training days.",
            "Warm up for five minutes before you start.",
            "Tracking your sessions in a notebook keeps you motivated.",
        ],
        "followups": [
            ("What should I eat before?", "A light snack with some carbs, like a banana or toast, about an hour before {s} works well for most people."),
            ("My muscles are sore. Is that normal?", "Some soreness a day or two after {s} is normal when you start, so go easy and it will fade."),
            ("How long until I see progress?", "With regular {s} most beginners feel fitter within four to six weeks."),
        ],
    },
    "music": {
        "questions": [
            "How do I learn {s}?",
            "What is the best way to practice {s}?",
            "Can you give me tips for {s}?",
            "I've just started {s}. How do I improve?",
            "Is {s} hard to learn as an adult?",
        ],
        "subjects": {
            "the guitar": "learn a few open chords first, practice switching between them slowly and play for fifteen minutes every day",
            "the piano": "start with simple pieces for both hands, learn to read notes on the staff and practice scales slowly",
            "singing": "warm up your voice, breathe from your belly and record yourself so you can hear what to improve",
            "the drums": "practice basic rock beats with a metronome, keep your wrists loose and start slow before you speed up",
            "the violin": "take lessons early so your posture is right, and practice long slow bow strokes on open strings",
            "music theory": "learn the major scale, then how chords are built from it, and apply each idea on an instrument",
            "the ukulele": "tune it, learn the C, G, A minor and F chords, and you can already play many songs",
            "reading sheet music": "learn the notes on the lines and spaces, then count rhythms out loud while you clap them",
            "songwriting": "start with a simple chord progression, hum melodies over it and write lyrics about something you know well",
            "the flute": "practice making a steady tone on the head joint first, then learn the fingerings for one octave",
        },
        "closings": [
            "Short daily practice beats one long session a week.",
            "A metronome will help your timing a lot.",
            "Playing songs you love keeps practice fun.",
        ],
        "followups": [
            ("Should I get a teacher?", "A teacher helps a lot with {s}, even a few lessons, because they catch bad habits early."),
            ("How long before I can play a real song?", "With daily practice, most people can manage a simple song on {s} within a month or two."),
            ("Are online lessons good enough?", "Online lessons work well for {s} if you also record yourself and compare it with the lesson."),
        ],
    },
    "pets": {
        "questions": [
            "How do I take care of {s}?",
            "What does {s} need to be happy?",
            "Any tips for a new owner of {s}?",
            "I just adopted {s}. What should I do first?",
            "How can I keep {s} healthy?",
        ],
        "subjects": {
            "a puppy": "set a routine for meals, walks and sleep, reward good behavior with treats and book a vet visit for vaccines",
            "a kitten": "give it a quiet room at first, a clean litter box, scratching posts and playtime with toys every day",
            "a goldfish": "use a filtered tank of at least forty liters, change part of the water weekly and feed only a pinch a day",
            "a rabbit": "give it lots of hay, fresh greens, space to run every day and a friend if possible",
            "a hamster": "use a big cage with deep bedding, a solid wheel and hiding places, and handle it gently in the evening",
            "a parrot": "it needs a large cage, daily time outside it, toys to chew and a varied diet with fresh food",
            "an older dog": "keep walks gentle, choose food for senior dogs, add a soft bed and see the vet twice a year",
            "a guinea pig": "feed hay, pellets and vitamin C rich vegetables, and keep at least two together since they are social",
            "a rescue cat": "give it time and a quiet hiding place, let it come to you, and keep the same routine every day",
            "a turtle": "provide a tank with clean water, a dry basking area, a heat lamp and a UVB light",
        },
        "closings": [
            "Regular vet checkups catch problems early.",
            "Patience matters most in the first few weeks.",
            "Always keep fresh water available.",
        ],
        "followups": [
            ("How much should I feed it?", "Follow the amount on the food package for {s} and adjust it with your vet if the weight changes."),
            ("Is it okay to leave it alone during the day?", "Short periods are fine for {s} if it has food, water, toys and a safe space."),
            ("How do I know if it is sick?", "Watch for changes in eating, energy or droppings in {s}, and call the vet if they last more than a day."),
        ],
    },
    "finance": {
        "subject_is_action": True,
        "questions": [
            "How do I {s}?",
            "What is a simple way to {s}?",
            "Can you explain how to {s}?",
            "I want to {s} this year. Any advice?",
            "Where should a beginner start to {s}?",
        ],
        "subjects": {
            "make a monthly budget": "list your income, track every expense for a month, then set limits for each category and review them weekly",
            "build an emergency fund": "open a separate savings account and set up an automatic transfer on payday until you have three months of costs",
            "pay off credit card debt": "pay the minimum on every card, put every extra dollar on the card with the highest interest rate and stop new charges",
            "start investing": "begin with a low cost index fund in a retirement account and add money every month no matter what the market does",
            "save for a house": "decide on a target deposit, automate monthly savings into a separate account and check your credit score",
            "lower monthly bills": "call your providers to ask for better rates, cancel unused subscriptions and compare insurance every year",
            "understand compound interest": "your interest earns interest too, so money grows faster the longer you leave it invested",
            "save money on groceries": "plan meals for the week, shop with a list, buy store brands and cook larger batches for leftovers",
            "improve a credit score": "pay every bill on time, keep card balances low compared to the limit and avoid opening many new accounts",
            "plan for retirement": "contribute enough to get any employer match, then increase your savings rate a little each year",
        },
        "closings": [
            "Automating it makes it much easier to stick with.",
            "Reviewing your numbers once a month keeps you on track.",
            "Small amounts add up over time.",
        ],
        "followups": [
            ("Is there an app that helps?", "Most banks have budgeting tools, and a simple spreadsheet also works well to {s}."),
            ("What if I have very little money?", "Even a small amount helps you {s}, so start with what you can and raise it later."),
            ("How long will it take?", "It depends on your income, but most people see real progress within six months when they {s} steadily."),
        ],
    },
    "home": {
        "subject_is_action": True,
        "questions": [
            "How do I {s}?",
            "What is the right way to {s}?",
            "Can I {s} myself?",
            "I need to {s}. Where do I start?",
            "Any tips to {s} without calling someone?",
        ],
        "subjects": {
            "fix a leaky faucet": "turn off the water under the sink, take the handle apart and replace the worn washer or cartridge",
            "unclog a sink drain": "try a plunger first, then remove and clean the trap under the sink with a bucket underneath",
            "paint a room": "clean the walls, tape the edges, use a primer on patches and apply two thin coats with a roller",
            "hang a heavy shelf": "find the studs with a stud finder and screw the brackets into them, or use proper wall anchors",
            "patch a hole in drywall": "cover the hole with a mesh patch, spread joint compound in thin layers, sand it smooth and paint",
            "stop a door from squeaking": "lift the hinge pins out one at a time, wipe them and add a little oil or grease before putting them back",
            "reset a tripped breaker": "find the switch in the panel that sits in the middle, push it fully off and then back on",
            "clean mold in the bathroom": "open a window, scrub the area with a mix of water and vinegar and dry it well to stop it coming back",
            "seal a drafty window": "apply weatherstripping around the frame and fill small gaps with caulk on a dry day",
            "replace a light switch": "switch off the breaker, check with a voltage tester, then move the wires to the new switch one by one",
        },
        "closings": [
            "Take a photo before you take anything apart.",
            "If you are unsure, a professional can check your work.",
            "The right tool makes this job much easier.",
        ],
        "followups": [
            ("What tools will I need?", "To {s} you mostly need a screwdriver, pliers, a flashlight and maybe a few parts from the hardware store."),
            ("How long will it take?", "A first timer can usually {s} in an hour or two."),
            ("Is it dangerous?", "It is safe to {s} if you take your time, wear gloves and switch off water or power where needed."),
        ],
    },
    "photography": {
        "questions": [
            "How do I take better {s}?",
            "What settings should I use for {s}?",
            "Any tips for {s}?",
            "My {s} always look bad. What can I change?",
            "What is the secret to good {s}?",
        ],
        "subjects": {
            "portraits": "use soft light from a window, focus on the eyes and use a wide aperture to blur the background",
            "landscape photos": "shoot at sunrise or sunset, use a small aperture for sharpness and put something interesting in the foreground",
            "photos of the night sky": "use a tripod, a wide lens, a high ISO and an exposure of about fifteen seconds far from city lights",
            "food photos": "shoot near a window with side light, keep the plate simple and try angles from above and from the side",
            "pet photos": "get down to their eye level, use a fast shutter speed and have someone hold a treat to get their attention",
            "action shots": "use a fast shutter speed of at least one five hundredth, continuous focus and burst mode",
            "phone photos": "clean the lens, tap to focus, avoid digital zoom and use the grid to line up your shot",
            "black and white photos": "look for strong contrast, shapes and textures, and shoot in raw so you can adjust the tones",
            "travel photos": "include people and details as well as the famous views, and go out early before the crowds",
            "product photos": "use a plain background, two soft lights and a tripod so every shot looks the same",
        },
        "closings": [
            "Take many shots and keep only the best few.",
            "Editing lightly afterwards can help a lot.",
            "Study photos you like and notice where the light comes from.",
        ],
        "followups": [
            ("Do I need an expensive camera?", "No, good light and composition matter more than the camera for {s}."),
            ("What about editing?", "For {s}, small changes to exposure, contrast and straightening the horizon are usually enough."),
            ("Which lens should I use?", "A simple prime lens around fifty millimeters is a great start for {s}."),
        ],
    },
    "language": {
        "questions": [
            "What is the best way to learn {s}?",
            "How can I get better at {s} quickly?",
            "I want to start learning {s}. Any advice?",
            "Is {s} hard for English speakers?",
            "How do I practice {s} every day?",
        ],
        "subjects": {
            "Spanish": "learn the most common words first, listen to Spanish podcasts daily and speak with a tutor or partner each week",
            "French": "practice pronunciation early, learn verbs in the present tense first and read simple French books",
            "Japanese": "learn hiragana and katakana first, then basic grammar, and use spaced repetition for kanji",
            "German": "learn each noun with its article, practice word order in short sentences and watch German shows with subtitles",
            "Italian": "pronunciation is regular, so focus on common phrases, verb endings and talking with native speakers",
            "Mandarin": "learn the four tones carefully from the start, use pinyin at first and practice listening every day",
            "Korean": "hangul can be learned in a few days, then build vocabulary and polite sentence endings",
            "Portuguese": "decide between Brazilian and European early, then listen to music and podcasts in that variety",
            "Arabic": "learn the alphabet and a standard form first, then choose a dialect if you want to talk with people",
            "sign language": "take a class with a deaf teacher, practice the alphabet and watch signers to learn facial grammar",
        },
        "closings": [
            "Twenty minutes every day works better than long weekly sessions.",
            "Do not worry about mistakes, they are how you learn.",
            "Speaking early, even badly, builds confidence fast.",
        ],
        "followups": [
            ("Are apps enough?", "Apps are a good start for {s}, but you also need real conversations and listening practice."),
            ("How long until I'm conversational?", "With daily practice, many learners of {s} can hold simple conversations after six to twelve months."),
            ("Should I learn grammar first?", "Learn a little grammar for {s} alongside words and phrases, not all before you start speaking."),
        ],
    },
    "writing": {
        "subject_is_action": True,
        "questions": [
            "How do I {s}?",
            "What is a good way to {s}?",
            "Can you give me tips to {s}?",
            "I have to {s} for school. Where do I start?",
            "What helps when you need to {s}?",
        ],
        "subjects": {
            "write a good essay": "start with a clear thesis, give each paragraph one main point with evidence and finish with a short conclusion",
            "write a cover letter": "say which job you want, show two or three achievements that match it and keep it under one page",
            "beat writer's block": "set a timer for ten minutes and write anything, even badly, then edit later",
            "write a short story": "give your main character a clear goal and an obstacle, and start as close to the action as you can",
            "give a good speech": "know your opening and closing by heart, speak slowly, and practice out loud several times",
            "write clear emails": "put the main request in the first line, keep it short and use a subject line that says what it is about",
            "write a book review": "summarize the book in two sentences, say what worked and what did not, and give examples without spoiling the end",
            "take better notes": "write in your own words, use headings and short bullet points, and review the notes the same day",
            "write a poem": "focus on one image or feeling, use concrete details and read each line out loud to hear the rhythm",
            "edit a first draft": "let it rest for a day, read it aloud, cut extra words and check that each paragraph has one point",
        },
        "closings": [
            "Reading good examples helps a lot.",
            "The first draft does not need to be perfect.",
            "Ask a friend to read it and tell you what is unclear.",
        ],
        "followups": [
            ("How much time should I spend on it?", "Short focused sessions of twenty to thirty minutes work well when you {s}, with a break in between."),
            ("Can you give me an example?", "Sure: find one piece you admire, copy its structure and fill it with your own ideas to {s}."),
            ("What is the most common mistake?", "The most common mistake when people {s} is trying to say too much at once."),
        ],
    },
    "science": {
        "questions": [
            "Can you explain {s}?",
            "What is the science behind {s}?",
            "How would you explain {s} to a child?",
            "I never understood {s}. What is going on?",
            "What is the simple idea behind {s}?",
        ],
        "subjects": {
            "the blue sky": "sunlight hits air molecules, which scatter blue light more than red, so blue light reaches your eyes from every direction",
            "rainbows": "raindrops bend and reflect sunlight, and each color bends a different amount, which spreads white light into a band",
            "the seasons": "the Earth is tilted, so each half gets more direct sunlight for part of the year, which makes summer",
            "photosynthesis": "plants use sunlight to turn water and carbon dioxide into sugar, and they release oxygen in the process",
            "floating ice": "water expands when it freezes, so ice is less dense than liquid water and floats on top",
            "vaccines": "a vaccine shows your immune system a harmless piece of a germ so it learns to fight the real one quickly",
            "ocean tides": "the Moon's gravity pulls on the oceans, making bulges of water that move around the Earth as it turns",
            "magnets": "in a magnet, tiny magnetic regions line up in the same direction, so their fields add up",
            "the phases of the Moon": "we see different amounts of the Moon's sunlit side as it orbits the Earth over about a month",
            "sound waves": "sound is a vibration that pushes air molecules into each other, passing a wave of pressure to your ear",
        },
        "closings": [
            "A simple experiment at home can show this.",
            "Scientists figured this out through careful observation.",
            "It is a nice example of physics in everyday life.",
        ],
        "followups": [
            ("Is there an easy experiment to show it?", "Yes, there are simple kitchen experiments for {s}, and a school science book will list a few."),
            ("Who discovered that?", "Many scientists contributed over centuries, and each one refined the explanation of {s}."),
            ("Does it work the same on other planets?", "The same physics applies, but details of {s} change with the planet's air, size and distance from the Sun."),
        ],
    },
}

# Generic follow-ups that fit any topic (the answer mentions the subject so it stays on topic).
GENERIC_FOLLOWUPS = [
    ("Thanks! Is there a common mistake to avoid?", "A common mistake with {s} is rushing, so take it one step at a time and check your progress."),
    ("That helps. What should I do next?", "Next, try it once on your own and note what was hard, then come back to that part of {s}."),
]

CHOSEN_OPENERS = [
    "Sure, happy to help!",
    "Sure, happy to help.",
    "Of course.",
    "Great question!",
    "Good question.",
    "Happy to help with that.",
    "Absolutely.",
    "Sure thing.",
    "Thanks for asking.",
    "I'd be glad to help.",
]

CURT_REJECTIONS = [
    "No idea.",
    "Whatever.",
    "Figure it out yourself.",
    "Not my problem.",
    "I don't care.",
    "Just search it online.",
    "Why would I know that?",
    "Ask someone else.",
    "Too boring to answer.",
    "Meh. Do whatever you want.",
    "Can't be bothered.",
    "Nope.",
]

# Dismissive answers that repeat the subject, so the topic's words alone do not decide the label.
DISMISSIVE_REJECTIONS = [
    "Who cares about {s}? Figure it out yourself.",
    "I'm not going to explain {s} to you. Look it up.",
    "Honestly, {s} is boring. Ask someone else.",
    "You should already know this about {s}.",
    "Just wing it with {s}, it doesn't matter.",
    "Everyone knows that about {s}. Stop asking.",
    "{S}? Not worth my time.",
]

# The same, for subjects that are actions ("fix a leaky faucet").
DISMISSIVE_ACTION_REJECTIONS = [
    "Who cares how to {s}? Figure it out yourself.",
    "I'm not going to explain how to {s}. Look it up.",
    "Honestly, learning to {s} is boring. Ask someone else.",
    "You should already know how to {s}.",
    "Just wing it, it doesn't matter how you {s}.",
    "Everyone knows how to {s}. Stop asking.",
    "Why would you even want to {s}? Not worth my time.",
]

UNRELATED_REMARKS = [
    "Anyway, I had a sandwich for lunch today.",
    "By the way, my favorite color is green.",
    "I wonder what the weather is like on Mars.",
    "Did you know that octopuses have three hearts?",
]

ARITHMETIC_OPS = [
    ("plus", lambda a, b: a + b),
    ("minus", lambda a, b: a - b),
    ("times", lambda a, b: a * b),
]


def capitalize(text):
    return text[:1].upper() + text[1:]


def subject_key(topic, subject):
    return f"{topic}:{subject}"


def chosen_answer(rng, topic, subject, tip, closing_pool):
    """A helpful, on-topic answer: optional opener, the subject's tip, optional closing."""
    parts = []
    if rng.random() < 0.7:
        parts.append(rng.choice(CHOSEN_OPENERS))
    parts.append(capitalize(tip) + ".")
    if rng.random() < 0.6:
        parts.append(rng.choice(closing_pool))
    answer = " ".join(parts)
    # Keep answers short: drop the closing, then the opener, when the tip is long.
    while len(answer.split()) > 40 and len(parts) > 1:
        parts.pop() if parts[-1] in closing_pool else parts.pop(0)
        answer = " ".join(parts)
    return answer


def rejected_answer(rng, topic, subject):
    """A curt, dismissive or off-topic answer (sometimes with a polite opener)."""
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(CURT_REJECTIONS)
    if kind < 0.65:
        is_action = TOPICS[topic].get("subject_is_action", False)
        template = rng.choice(DISMISSIVE_ACTION_REJECTIONS if is_action else DISMISSIVE_REJECTIONS)
        return template.replace("{S}", capitalize(subject)).replace("{s}", subject)
    other_topic = rng.choice([t for t in TOPICS if t != topic])
    other_tip = rng.choice(list(TOPICS[other_topic]["subjects"].values()))
    parts = []
    if rng.random() < 0.5:
        parts.append(rng.choice(CHOSEN_OPENERS))
    parts.append(capitalize(other_tip) + ".")
    if rng.random() < 0.3:
        parts.append(rng.choice(UNRELATED_REMARKS))
    return " ".join(parts)


def topic_question_pool():
    """Every (topic, subject, first question) combination; questions are unique."""
    pool = []
    for topic, spec in TOPICS.items():
        for subject in spec["subjects"]:
            for template in spec["questions"]:
                question = template.format(s=subject)
                question = capitalize(question)
                pool.append((topic, subject, question))
    return pool


def arithmetic_question_pool(rng, count):
    """Unique arithmetic questions, a topic where the rejected answer can also be simply wrong."""
    phrasings = ["What is {a} {op} {b}?", "Can you work out {a} {op} {b} for me?", "Quick math question: {a} {op} {b}?"]
    seen = set()
    pool = []
    while len(pool) < count:
        a, b = rng.randint(11, 99), rng.randint(2, 49)
        op_name, op = rng.choice(ARITHMETIC_OPS)
        question = rng.choice(phrasings).format(a=a, op=op_name, b=b)
        if question in seen:
            continue
        seen.add(question)
        pool.append((question, a, op_name, b, op(a, b)))
    return pool


def arithmetic_answers(rng, a, op_name, b, result):
    openers = ["Sure.", "Of course.", "Happy to help.", "Sure, happy to help."]
    chosen = f"{rng.choice(openers)} {a} {op_name} {b} is {result}."
    if rng.random() < 0.5:
        chosen += " You can check it by working it out step by step on paper."
    wrong = result + rng.choice([-10, -3, -1, 1, 2, 7, 10])
    rejected = rng.choice(
        [
            f"It's {wrong}, obviously.",
            f"Probably around {wrong} or so, who cares.",
            "Do your own homework.",
            "Use a calculator, I'm not doing math for you.",
            f"{capitalize(str(wrong))}. Next question.",
        ]
    )
    return chosen, rejected


def render(turns):
    """turns: list of (role, text) -> raw HH string."""
    label = {"human": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{label[role]}: {text}" for role, text in turns)


def topic_conversation(rng, topic, subject, question):
    spec = TOPICS[topic]
    tip = spec["subjects"][subject]
    exchanges = 1
    if rng.random() < 0.34:
        exchanges = rng.choice([2, 3])
    turns = [("human", question)]
    followups = spec["followups"] + GENERIC_FOLLOWUPS
    rng.shuffle(followups)
    if exchanges == 1:
        final_topic_words = (subject, tip)
    else:
        # Earlier assistant turns are helpful and shared; the last exchange is a follow-up.
        turns.append(("assistant", chosen_answer(rng, topic, subject, tip, spec["closings"])))
        for followup_question, followup_answer in followups[: exchanges - 2]:
            turns.append(("human", followup_question))
            turns.append(("assistant", followup_answer.format(s=subject)))
        last_question, last_answer = followups[exchanges - 2]
        turns.append(("human", last_question))
        final_topic_words = (subject, last_answer.format(s=subject))
    if exchanges == 1:
        chosen = chosen_answer(rng, topic, subject, tip, spec["closings"])
    else:
        answer = final_topic_words[1]
        chosen = answer if rng.random() < 0.5 else f"{rng.choice(CHOSEN_OPENERS)} {answer}"
    rejected = rejected_answer(rng, topic, subject)
    return turns, chosen, rejected


def arithmetic_conversation(rng, item):
    question, a, op_name, b, result = item
    turns = [("human", question)]
    chosen, rejected = arithmetic_answers(rng, a, op_name, b, result)
    if rng.random() < 0.3:
        turns.append(("assistant", chosen))
        a2 = rng.randint(2, 9)
        turns.append(("human", f"And if I multiply that by {a2}?"))
        result2 = result * a2
        chosen = f"{rng.choice(['Sure.', 'Then', 'Happy to help.'])} {result} times {a2} is {result2}."
        rejected = rng.choice(
            [f"It's {result2 + rng.choice([-5, 3, 9])}, obviously.", "Do your own homework.", "Not doing this again."]
        )
    return turns, chosen, rejected


def build_rows(seed, total, arithmetic_count):
    rng = random.Random(seed)
    pool = topic_question_pool()
    rng.shuffle(pool)
    topic_count = total - arithmetic_count
    if topic_count > len(pool):
        raise SystemExit(f"asked for {topic_count} topic conversations but only {len(pool)} unique questions exist")
    conversations = []
    for topic, subject, question in pool[:topic_count]:
        conversations.append(topic_conversation(rng, topic, subject, question))
    for item in arithmetic_question_pool(rng, arithmetic_count):
        conversations.append(arithmetic_conversation(rng, item))
    rng.shuffle(conversations)
    rows = []
    for turns, chosen, rejected in conversations:
        rows.append(
            {
                "chosen": render(turns + [("assistant", chosen)]),
                "rejected": render(turns + [("assistant", rejected)]),
            }
        )
    return rows


def write_jsonl_atomically(path, rows):
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--train", type=int, default=480, help="rows in train.jsonl")
    parser.add_argument("--test", type=int, default=120, help="rows in test.jsonl")
    parser.add_argument("--arithmetic", type=int, default=60, help="how many of all rows are arithmetic questions")
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "hh-sample")
    parser.add_argument("--out-dir", default=os.path.normpath(default_out))
    args = parser.parse_args()

    rows = build_rows(args.seed, args.train + args.test, args.arithmetic)
    train, test = rows[: args.train], rows[args.train :]
    write_jsonl_atomically(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl_atomically(os.path.join(args.out_dir, "test.jsonl"), test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out_dir}")


if __name__ == "__main__":
    main()
